"""DecodeConfig: what a ReDrafter step drafts and verifies, defined once for every layer.

The decoder, sessions, an engine's config.json (its built limits), build options, serving,
the benchmark and every command line take this one object; its fields, defaults, validation
and command-line flags live here only. An engine may run any setting whose tree fits the
cache it was built for (`check_within`); plain decoding (beam length 1) always fits.
"""
from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass, field, fields, replace
from typing import Any

# What a step verifies: the W final beams ("beams", as in the paper and TensorRT-LLM), or every
# prefix the beam search kept on the way ("search": 1 + W(L-1) tokens).
TREES = ("beams", "search")


def _flag(flag: str, metavar: str, help: str, minimum: int = 1) -> dict[str, Any]:
    return {"metadata": {"flag": flag, "metavar": metavar, "help": help, "minimum": minimum}}


@dataclass(frozen=True)
class DecodeConfig:
    """W beams of L tokens (counting the guaranteed token; L = 1: plain decoding), the tree a step
    verifies, and the optional context lookup beam (runtime/lookup.py) of max(lookup_length, L)
    tokens after a match of the last 1..lookup_ngram tokens (0: off)."""
    beam_width: int = field(default=1, **_flag("--beam-width", "W", "W: beams drafted per step"))
    beam_length: int = field(default=2, **_flag(
        "--beam-length", "L", "L: tokens per beam, counting the guaranteed token (L-1 drafted; 1: plain decoding)"))
    tree: str = field(default="beams", **_flag(
        "--tree", "beams|search", "what a step verifies: the W final beams (beams) or every prefix the beam search kept "
                  "(search: 1 + W(L-1) tokens, more accepted per step)"))
    lookup_ngram: int = field(default=0, **_flag(
        "--lookup", "N", "context lookup: also verify a beam copying what followed the last 1..N tokens earlier in "
                    "the text (0: off)", minimum=0))
    lookup_length: int = field(default=0, **_flag(
        "--lookup-length", "K", "with --lookup: the lookup beam's tokens, counting the guaranteed token, if more than "
                           "L (0: L)", minimum=0))

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "tree" and (not isinstance(value, int) or value < f.metadata["minimum"]):
                raise ValueError(f"{f.name} ({f.metadata['flag']}) must be an integer >= {f.metadata['minimum']}, "
                                 f"got {value!r}")
        if self.tree not in TREES:
            raise ValueError(f"tree={self.tree!r}: give one of {', '.join(TREES)}")
        if self.lookup_length and not self.lookup_ngram:
            raise ValueError(f"lookup_length={self.lookup_length} sets the lookup beam's length: give lookup_ngram "
                             "> 0 (--lookup N) too, or lookup_length 0")

    @classmethod
    def for_device(cls, device: Any = "cpu") -> "DecodeConfig":
        """The device's default. On a CPU W1 L2: a step's cost grows with every verified token, so
        one drafted token pays best (BENCHMARKS.md); on a GPU verifying 16 tokens costs about what 1
        does, so W4 L4."""
        return cls(4, 4) if str(device).startswith("cuda") else cls()

    @classmethod
    def plain(cls) -> "DecodeConfig":
        """Plain decoding: one token per step, nothing drafted."""
        return cls(beam_width=1, beam_length=1)

    @property
    def speculative(self) -> bool:
        return self.beam_length > 1

    @property
    def keep_prefixes(self) -> bool:
        return self.tree == "search"

    @property
    def step_length(self) -> int:
        """The most tokens a step emits: the longest beam's (the lookup beam's may be longer)."""
        return max(self.beam_length, self.lookup_length) if self.lookup_ngram else self.beam_length

    @property
    def tree_tokens(self) -> int:
        """The most tokens a step verifies: W drafted beams of L (or their search tree, which has
        1 + W(L-1) tokens, no more), and the lookup beam; the scratch area the cache keeps."""
        return self.beam_width * self.beam_length + (self.step_length if self.lookup_ngram else 0)

    def with_shape(self, width: int, length: int) -> "DecodeConfig":
        return replace(self, beam_width=width, beam_length=length)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def check_within(self, limits: "DecodeConfig", what: str = "the engine") -> None:
        """Raise unless a decoder built for `limits` can run this setting: its tree fits the cache's
        scratch area and a lookup beam has the token history kept for it. Plain decoding always fits."""
        if not self.speculative:
            return
        if self.lookup_ngram and not limits.lookup_ngram:
            raise ValueError(f"{what} was built without a lookup beam: drop --lookup, or rebuild with --lookup N")
        if self.tree_tokens > limits.tree_tokens:
            raise ValueError(f"W{self.beam_width} L{self.beam_length} ({self.tree_tokens} tree tokens) exceeds "
                             f"{what}'s limit of {limits.tree_tokens} (built for W{limits.beam_width} "
                             f"L{limits.beam_length}): choose a smaller beam shape, or rebuild with a larger one")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DecodeConfig":
        """From to_json's dict, or from an old engine's build options, which held the same keys
        among others (a missing tree: beams, lookup: off)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})


# ---------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser, sweep: bool = False, plain: bool = True) -> None:
    """The decode flags, one per DecodeConfig field (default None: the layer's default). sweep:
    comma-separated lists whose every combination is measured (`redrafter bench`); plain: also
    --no-spec."""
    group = parser.add_argument_group("decoding (DecodeConfig)")
    for f in fields(DecodeConfig):
        many = sweep and f.name != "lookup_length"
        group.add_argument(f.metadata["flag"], dest=f.name, type=_parser(f.name, f.metadata["minimum"], many), default=None,
                           metavar=f.metadata["metavar"] + (",..." if many else ""),
                           help=f"{f.metadata['help']} (default {f.default}{'; cuda: 4' if 'beam' in f.name else ''})")
    if plain:
        group.add_argument("--no-spec", action="store_true", help="plain decoding: no drafting")


def given(args: argparse.Namespace) -> list[str]:
    """The decode flags given on the command line."""
    flags = [f.metadata["flag"] for f in fields(DecodeConfig) if getattr(args, f.name, None) is not None]
    return flags + (["--no-spec"] if getattr(args, "no_spec", False) else [])


def from_args(args: argparse.Namespace, defaults: DecodeConfig) -> DecodeConfig:
    """The DecodeConfig of add_arguments' flags (sweep=False): the given ones on `defaults` (the
    device's, DecodeConfig.for_device, or an engine's built setting)."""
    if getattr(args, "no_spec", False):
        extra = [flag for flag in given(args) if flag != "--no-spec"]
        if extra:
            raise ValueError(f"--no-spec decodes plainly: drop {', '.join(extra)}")
        return DecodeConfig.plain()
    return replace(defaults, **{f.name: getattr(args, f.name) for f in fields(DecodeConfig)
                                if getattr(args, f.name, None) is not None})


def sweep_from_args(args: argparse.Namespace, defaults: DecodeConfig) -> list[DecodeConfig]:
    """Every combination of add_arguments' lists (sweep=True), the fields not given from `defaults`."""
    lists = {name: getattr(args, name, None) or [getattr(defaults, name)]  # the order bench's table keeps
             for name in ("beam_width", "beam_length", "lookup_ngram", "tree")}
    length = defaults.lookup_length if args.lookup_length is None else args.lookup_length
    out = []
    for combo in itertools.product(*lists.values()):
        values = dict(zip(lists, combo))
        values["lookup_length"] = length if values["lookup_ngram"] else 0
        out.append(DecodeConfig(**values))
    if args.lookup_length and not any(c.lookup_ngram for c in out):
        raise ValueError("--lookup-length sets the lookup beam's length: give --lookup N too")
    return out


def counts(minimum: int, many: bool = True) -> Any:
    """An argparse type: comma-separated integers >= minimum, sorted (many), or one."""
    return _parser("", minimum, many)


def _parser(name: str, minimum: int, many: bool) -> Any:
    def one(text: str) -> int | str:
        if name == "tree":
            if text not in TREES:
                raise argparse.ArgumentTypeError(f"expected {' or '.join(TREES)}, got {text!r}")
            return text
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    def parse(text: str) -> Any:
        if not many:
            return one(text.strip())
        items = list(dict.fromkeys(one(t.strip()) for t in text.split(",") if t.strip()))
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return items if name == "tree" else sorted(items)
    return parse
