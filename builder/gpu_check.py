"""Prepared device check: build and run small engines and print timings, one JSON line per engine.

    python -m redrafter.builder.gpu_check --device cuda            # SmolLM2-135M shape, random weights
    python -m redrafter.builder.gpu_check --device cpu --layers 2  # the quick CPU path (CI-sized)
    python -m redrafter.builder.gpu_check --device cuda --tree search  # steps verifying the search tree
    python -m redrafter.builder.gpu_check --kernels    # the Triton kernels against the ops' references
    TRITON_INTERPRET=1 python -m redrafter.builder.gpu_check --kernels --device cpu --tiny   # dry run

The GPU machines hold no model files, so the base model is a random Llama of SmolLM2-135M's
shape (30 layers, hidden 576, 9/3 heads, vocab 49152, tied) with a random shared-head drafter
and a synthetic word-level tokenizer; prompts are random token ids. A random drafter is
(almost) never accepted, so ReDrafter timings here measure the cost of a speculative step,
not a speedup. Checks: every backend's greedy tokens equal eager's (fp32), and ReDrafter's
equal plain decoding's on each engine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from redrafter.runtime.loading import SMOLLM2_135M as SMOLLM2


def random_checkpoint(root: Path, layers: int, seed: int = 0) -> tuple[Path, Path]:
    """A random SmolLM2-shaped HF directory (with a synthetic tokenizer) and a drafter directory."""
    from redrafter.runtime.drafter import DraftHead, DrafterConfig, save_drafter
    from redrafter.runtime.loading import save_hf_checkpoint
    from redrafter.runtime.model import Llama, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(**(SMOLLM2 | {"num_layers": layers}))
    model = Llama(cfg)
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.05)
    base = save_hf_checkpoint(model, root / "base")
    _synthetic_tokenizer(cfg.vocab_size).save_pretrained(str(base))
    head = DraftHead(DrafterConfig.for_base(cfg.vocab_size, cfg.hidden_size, head="shared"))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return base, save_drafter(head, root / "drafter")


def _synthetic_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_engine(path: Path, prompt: list[int], new_tokens: int, device: str) -> dict:
    from redrafter.builder.engine import load_engine
    from redrafter.runtime.config import DecodeConfig
    from redrafter.runtime.decoding import generate

    t = time.perf_counter()
    engine = load_engine(path)
    load_s = time.perf_counter() - t
    out = {"engine": path.name, "load_s": round(load_s, 2)}
    modes = [("redrafter", True, None), ("plain", False, None)]
    if engine.programs().step is not None:  # the other side of the engine's fused-step default
        modes.append(("redrafter-fused" if engine.model.embed.weight.device.type != "cuda" else
                      "redrafter-unfused", True, engine.model.embed.weight.device.type != "cuda"))
    for mode, spec, fused in modes:
        decoder = engine.decoder(decode=None if spec else DecodeConfig.plain(), fused_step=fused)
        generate(decoder, [prompt], 8, ())  # warm-up (first calls allocate / autotune)
        _sync(device)
        t = time.perf_counter()
        g = generate(decoder, [prompt], new_tokens, ())[0]
        _sync(device)
        seconds = time.perf_counter() - t
        out[mode] = {"tokens": g.token_ids, "tok_per_s": round(len(g.token_ids) / seconds, 1),
                     "ttft_ms": round(g.prefill_s * 1e3, 2), "steps": g.steps,
                     "ms_per_step": round((seconds - g.prefill_s) / max(g.steps, 1) * 1e3, 2),
                     "tokens_per_step": round(g.tokens_per_step, 3)}
    return out


def _modes(result: dict) -> list[str]:
    """The ReDrafter modes run_engine measured (each with its tokens)."""
    return [m for m in result if m.startswith("redrafter") and isinstance(result[m], dict)]


def main(argv: list[str] | None = None) -> int:
    from redrafter.runtime.config import TREES, DecodeConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    p.add_argument("--backends", default="eager,aoti", help="comma list of eager, aoti, onnx")
    p.add_argument("--int8", action="store_true", help="also build and run an int8 aoti engine")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--beam-width", type=int, default=4)
    p.add_argument("--beam-length", type=int, default=4)
    p.add_argument("--tree", default="beams", choices=list(TREES),
                   help="what a step verifies: the W final beams or every prefix the beam search kept")
    p.add_argument("--out", help="also write the results here (JSON; --kernels: a directory, default $OUT)")
    p.add_argument("--kernels", action="store_true", help="check the Triton kernels against the ops' references "
                   "and time both instead (plugins.gpu_check; --device cpu needs TRITON_INTERPRET=1)")
    p.add_argument("--tiny", action="store_true", help="--kernels: tiny shapes (the CPU dry run)")
    p.add_argument("--reps", type=int, help="--kernels: timed repetitions per case (default 10 on cuda, 1 on cpu)")
    p.add_argument("--compile-only", type=int, metavar="ARCH", help="--kernels: only compile every kernel for "
                   "CUDA sm_ARCH (e.g. 90); needs no GPU")
    args = p.parse_args(argv)
    if args.kernels or args.compile_only is not None:
        from redrafter.plugins.gpu_check import check_kernels

        return check_kernels(args.device, args.tiny, args.reps, args.out or os.environ.get("OUT"), args.compile_only)
    from redrafter.builder.build import BuildOptions, build_engine

    info = {"device": args.device, "torch": torch.__version__,
            "card": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "layers": args.layers,
            "beams": f"W{args.beam_width} L{args.beam_length} {args.tree}"}
    print(json.dumps(info), flush=True)
    results, ok = [], True
    with tempfile.TemporaryDirectory(prefix="redrafter-gpu-check-") as tmp:
        root = Path(tmp)
        base, drafter = random_checkpoint(root, args.layers)
        prompt = torch.randint(3, SMOLLM2["vocab_size"], (args.prompt_len,),
                               generator=torch.Generator().manual_seed(1)).tolist()
        backends = args.backends.split(",")
        plan = ([(b, "none", False) for b in backends] + ([("aoti", "none", True)] if "aoti" in backends else [])
                + ([("aoti", "int8", False)] if args.int8 else []))
        ref = None  # eager's plain tokens (the plan builds eager first)
        for backend, quant, plugin_ops in plan:  # plugin_ops: the draft program calls redrafter::beam_draft
            t = time.perf_counter()
            path = build_engine(BuildOptions(
                output=root / f"{backend}{'+plugins' if plugin_ops else ''}-{quant}", base=base, drafter=drafter,
                backend=backend, quantize=quant, device=args.device,
                decode=DecodeConfig(args.beam_width, args.beam_length, args.tree), max_batch_size=1,
                max_seq_len=args.prompt_len + args.new_tokens + 16, plugin_ops=plugin_ops, progress=True))  # stage times in the log
            r = run_engine(path, prompt, args.new_tokens, args.device) | {"build_s": round(time.perf_counter() - t, 1)}
            r["redrafter_equals_plain"] = all(r[m]["tokens"] == r["plain"]["tokens"] for m in _modes(r))
            ok &= r["redrafter_equals_plain"]
            if r["engine"] == "eager-none":
                ref = r["plain"]["tokens"]
            elif ref is not None and r["engine"].endswith("-none"):
                r["equals_eager"] = r["plain"]["tokens"] == ref
                ok &= r["equals_eager"]
            for mode in _modes(r) + ["plain"]:
                r[mode].pop("tokens")
            print(json.dumps(r), flush=True)  # engine by engine: a run cut short keeps what it measured
            results.append(r)
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, "results": results, "ok": ok}, indent=2))
    print("OK" if ok else "MISMATCH: a backend's tokens differ (see equals_eager / redrafter_equals_plain)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
