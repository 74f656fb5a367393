"""What a benchmark measures: our runtime over --base/--drafter, or an engine from `redrafter build`.

Either way the same object gives the plain decoder (no drafter: the baseline) and the
ReDrafter decoders, so the speedup compares one model's two decoding modes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from redrafter.runtime.config import DecodeConfig
from redrafter.runtime.decoding import Decoder


@dataclass
class Target:
    tokenizer: Any
    eos_ids: list[int]
    encode_chat: Callable[[str], list[int]]
    configs: list[DecodeConfig]  # ReDrafter settings to measure (empty without a drafter)
    # (batch, config or None = plain, max_seq_len, fused: an engine's step program; None: its default)
    new_decoder: Callable[[int, DecodeConfig | None, int, bool | None], Decoder]
    hf_dir: Path  # the HF checkpoint the transformers peer runs
    device: Any  # torch.device of the model under test (the HF peer runs there too)
    settings: dict  # what was loaded, for the JSON report
    name: str = ""  # the engine's name, where several are compared
    fused: list[bool | None] = field(default_factory=lambda: [None])  # each config is measured with each


def open_target(engine: str | None, base: str | None, drafter: str | None, configs: list[DecodeConfig],
                batch_sizes: list[int], device: str | None, name: str = "") -> Target:
    """configs: the settings to measure (an engine's within its built one)."""
    if engine:
        if drafter:
            raise ValueError("--engine brings its own drafter: drop --drafter (or bench --base/--drafter instead)")
        return _engine_target(engine, base, configs, batch_sizes, device, name)
    from redrafter.runtime.pipeline import default_drafter_dir, load

    drafter = None if drafter == "none" else (drafter or "default")
    if drafter == "default" and not default_drafter_dir().is_dir():
        raise FileNotFoundError(f"the shipped drafter {str(default_drafter_dir())!r} does not exist yet: "
                                "pass --drafter DIR, or --drafter none to measure plain decoding and peers only")
    loaded = load(base or "default", drafter, device=device or "cpu")
    configs = configs if loaded.drafter else []

    if loaded.model.embed.weight.device.type == "cpu":  # this machine's linear tactics (measured once, cached)
        from redrafter.runtime.tactics import use_plan

        trees = [c.tree_tokens for c in configs] or [1]
        use_plan(loaded.model, max_rows=max(batch_sizes) * max(trees), tree_sizes=trees)

    def new_decoder(batch: int, config: DecodeConfig | None, max_seq_len: int, fused: bool | None) -> Decoder:
        return Decoder(loaded.model, loaded.drafter if config else None, config, max_batch=batch,
                       max_seq_len=max_seq_len)

    settings = {"engine": None, "base": base or "default", "base_dir": str(loaded.base_dir), "drafter": drafter,
                "drafter_config": asdict(loaded.drafter.cfg) if loaded.drafter else None,
                "dtype": str(loaded.model.embed.weight.dtype).removeprefix("torch."),
                "device": str(loaded.model.embed.weight.device)}
    return Target(loaded.tokenizer, loaded.eos_ids, loaded.encode_chat, configs, new_decoder, loaded.base_dir,
                  loaded.model.embed.weight.device, settings)


def _engine_target(path: str, base: str | None, configs: list[DecodeConfig], batch_sizes: list[int],
                   device: str | None, name: str) -> Target:
    from redrafter.builder.engine import load_engine
    from redrafter.runtime.loading import resolve_base

    engine = load_engine(path, device=device)
    o = engine.options
    configs = configs if engine.drafter else []
    for c in configs:
        c.check_within(o.decode, f"the engine {path}")
    if max(batch_sizes) > o.max_batch_size:
        raise ValueError(f"batch size {max(batch_sizes)} exceeds the engine's max batch size {o.max_batch_size}: "
                         "rebuild it with a larger --max-batch-size")

    def new_decoder(batch: int, config: DecodeConfig | None, max_seq_len: int, fused: bool | None) -> Decoder:
        # The engine fixes max_seq_len at build time; `generate` rejects prompts that do not fit.
        return engine.decoder(batch, config or DecodeConfig.plain(), fused_step=fused)

    settings = {"engine": str(path), "base": base or "default", "drafter": "engine" if engine.drafter else None,
                "drafter_config": engine.config.get("drafter"), "engine_build": engine.config["build"],
                "dtype": o.dtype, "device": str(engine.model.embed.weight.device)}
    fused = [False, True] if engine.drafter and engine.programs().step is not None else [None]
    return Target(engine.tokenizer, engine.eos_ids, engine.encode_chat, configs, new_decoder,
                  resolve_base(base or "default"), engine.model.embed.weight.device, settings, name, fused)
