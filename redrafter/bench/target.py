"""What a benchmark measures: our runtime over --base/--drafter, or an engine from `redrafter build`.

Either way the same object gives the plain decoder (no drafter: the baseline) and the
ReDrafter decoders, so the speedup compares one model's two decoding modes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from redrafter.runtime.decoding import Decoder

# (beam width W, beam length L, context lookup n-gram or 0, its beam's length or 0, tree: runtime.decoding.TREES)
Config = tuple[int, int, int, int, str]


@dataclass
class Target:
    tokenizer: Any
    eos_ids: list[int]
    encode_chat: Callable[[str], list[int]]
    configs: list[Config]  # ReDrafter configurations to measure (empty without a drafter)
    new_decoder: Callable[[int, Config | None, int], Decoder]  # (batch, config or None = plain, max_seq_len)
    hf_dir: Path  # the HF checkpoint the transformers peer runs
    device: Any  # torch.device of the model under test (the HF peer runs there too)
    settings: dict  # what was loaded, for the JSON report


def open_target(engine: str | None, base: str | None, drafter: str | None, widths: list[int] | None,
                lengths: list[int] | None, lookups: list[int], lookup_length: int, batch_sizes: list[int],
                device: str | None, trees: list[str] | None = None) -> Target:
    if engine:
        if drafter:
            raise ValueError("--engine brings its own drafter: drop --drafter (or bench --base/--drafter instead)")
        if any(lookups) or lookup_length:
            raise ValueError("an engine's lookup beam is chosen when it is built (`redrafter build --lookup N "
                             "--lookup-length K`): drop --lookup/--lookup-length, or bench --base/--drafter")
        if trees:
            raise ValueError("an engine's tree is chosen when it is built (`redrafter build --tree search`): drop "
                             "--tree, or bench --base/--drafter")
        return _engine_target(engine, base, widths, lengths, batch_sizes, device)
    if lookup_length and not any(lookups):
        raise ValueError("--lookup-length sets the lookup beam's length: give --lookup N too")
    from redrafter.runtime.pipeline import default_drafter_dir, load

    drafter = None if drafter == "none" else (drafter or "default")
    if drafter == "default" and not default_drafter_dir().is_dir():
        raise FileNotFoundError(f"the shipped drafter {str(default_drafter_dir())!r} does not exist yet: "
                                "pass --drafter DIR, or --drafter none to measure plain decoding and peers only")
    loaded = load(base or "default", drafter, device=device or "cpu")
    configs = ([(w, l, n, lookup_length if n else 0, t) for w in widths or [4] for l in lengths or [4]
                for n in lookups for t in trees or ["beams"]] if loaded.drafter else [])

    if loaded.model.embed.weight.device.type == "cpu":  # this machine's linear tactics (measured once, cached)
        from redrafter.runtime.decoding import tree_tokens
        from redrafter.runtime.tactics import use_plan

        trees = [tree_tokens(w, l, n, k) for w, l, n, k, _ in configs] or [1]
        use_plan(loaded.model, max_rows=max(batch_sizes) * max(trees), tree_sizes=trees)

    def new_decoder(batch: int, config: Config | None, max_seq_len: int) -> Decoder:
        w, l, n, k, tree = config or (1, 1, 0, 0, "beams")
        return Decoder(loaded.model, loaded.drafter if config else None, max_batch=batch, max_seq_len=max_seq_len,
                       beam_width=w, beam_length=l, lookup_ngram=n, lookup_length=k, tree=tree)

    settings = {"engine": None, "base": base or "default", "base_dir": str(loaded.base_dir), "drafter": drafter,
                "drafter_config": asdict(loaded.drafter.cfg) if loaded.drafter else None,
                "dtype": str(loaded.model.embed.weight.dtype).removeprefix("torch."),
                "device": str(loaded.model.embed.weight.device)}
    return Target(loaded.tokenizer, loaded.eos_ids, loaded.encode_chat, configs, new_decoder, loaded.base_dir,
                  loaded.model.embed.weight.device, settings)


def _engine_target(path: str, base: str | None, widths: list[int] | None, lengths: list[int] | None,
                   batch_sizes: list[int], device: str | None) -> Target:
    from redrafter.builder.engine import load_engine
    from redrafter.runtime.loading import resolve_base

    engine = load_engine(path, device=device)
    o = engine.options
    built = (o.beam_width, o.beam_length)
    if any(w != o.beam_width for w in widths or []) or any(l != o.beam_length for l in lengths or []):
        raise ValueError(f"the engine was built for W={o.beam_width}, L={o.beam_length}: drop --beam-width/"
                         "--beam-length or rebuild the engine with the shape to measure")
    if max(batch_sizes) > o.max_batch_size:
        raise ValueError(f"batch size {max(batch_sizes)} exceeds the engine's max batch size {o.max_batch_size}: "
                         "rebuild it with a larger --max-batch-size")

    def new_decoder(batch: int, config: Config | None, max_seq_len: int) -> Decoder:
        # The engine fixes max_seq_len at build time; `generate` rejects prompts that do not fit.
        return engine.decoder(batch, speculative=config is not None)

    settings = {"engine": str(path), "base": base or "default", "drafter": "engine" if engine.drafter else None,
                "drafter_config": engine.config.get("drafter"), "engine_build": engine.config["build"],
                "dtype": o.dtype, "device": str(engine.model.embed.weight.device)}
    configs = [(*built, o.lookup_ngram, o.lookup_length, o.tree)] if engine.drafter else []
    return Target(engine.tokenizer, engine.eos_ids, engine.encode_chat, configs,
                  new_decoder, resolve_base(base or "default"), engine.model.embed.weight.device, settings)
