"""Tactics for the linear layers: which implementation of y = x W^T + b each weight shape runs
with, for each number of rows, chosen on the machine that runs it.

Why: the fastest way to multiply a few rows by a weight matrix depends on the CPU's BLAS. On
one CPU, W @ x.T with one row padded to two streams the weights twice as fast as x @ W.T; on
another it is 2.4x slower. A rule measured on one machine is a guess on the next, so each
machine measures its own plan (`tune`), once, and keeps it (`cached_plan`; engines record theirs
in config.json).

Lossless first: verifying T tokens at once must give every token the bits it gets decoded
alone, or a near tie can make ReDrafter's output differ from plain decoding. A BLAS GEMM does
not promise that (its 1-row product is often a matrix-vector kernel with another summation
order), so a candidate is admitted only if, on this machine and shape, it is close to the
float64 product and row-invariant: for every row count m it will run, each row of its m-row
product equals the same row multiplied alone. Candidates whose single rows give the same bits
form a family; a shape's plan takes every row bucket's tactic from one family (the one whose
buckets are fastest in total), so the plan as a whole is row-invariant, not just each tactic.

Fixed-block forms (pad to a multiple of B rows, multiply blocks of exactly B rows with one
batched GEMM) make a BLAS GEMM row-invariant in practice: every block is the same M = B
product, whatever the row count. The gate still checks it, since no BLAS promises it.

Compiled programs trace one tactic for every row count (torch.export keeps the count symbolic):
`ShapePlan.compiled` is the fastest admitted tactic among those that export with a symbolic
row count (`Tactic.export_safe`). Rows above the largest bucket (long prefills, which plain
and ReDrafter decoding share) run as layer(x).

Modes (REDRAFTER_TACTICS): "measure" (default): gate and time, cached per machine; "gate":
gate without timing, taking the first admitted candidate of CANDIDATES' order (deterministic:
tests and CI); a tactic name: that tactic everywhere it applies, ungated (experiments).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .atomic import atomic_file

log = logging.getLogger(__name__)

MODE_ENV = "REDRAFTER_TACTICS"
CACHE_ENV = "REDRAFTER_CACHE"
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
         "amx_tile", "amx_bf16", "amx_int8")
GATE_SEED = 1234

# ---------------------------------------------------------------------------- the machine


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags":
            flags = set(value.split())
        if flags and model:
            break
    return model, flags


def machine_signature() -> dict[str, Any]:
    """What a plan's timings depend on: the CPU model and its relevant ISA flags, the CPUs the
    OS gives, the threads torch uses, torch's version and the kernels it dispatches to."""
    model, flags = _cpuinfo()
    return {"cpu": model, "flags": sorted(f for f in FLAGS if f in flags), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability()}


def signature_id(signature: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- candidates

Fn = Callable[[nn.Module, Tensor], Tensor]  # (layer, x [m, in]) -> [m, out]


def weight_kind(layer: nn.Module) -> str:
    """float (nn.Linear), or what a quantized module says it is (builder.quantize: int8, int4)."""
    return "float" if isinstance(layer, nn.Linear) else getattr(layer, "weight_kind", type(layer).__name__)


def act_dtype(layer: nn.Module) -> torch.dtype:
    """The activations' dtype: the weight's for a float layer, the scales' for a quantized one."""
    if isinstance(layer, nn.Linear):
        return layer.weight.dtype
    for name in ("scale", "scales_and_zeros"):
        t = getattr(layer, name, None)
        if isinstance(t, Tensor):
            return t.dtype
    return torch.float32


@dataclass(frozen=True)
class Tactic:
    """One way to compute layer(x) on CPU rows. `needs`: a CPU flag (any of them) it requires."""
    name: str
    fn: Fn
    kinds: tuple[str, ...] = ("float",)
    dtypes: tuple[torch.dtype, ...] | None = None
    export_safe: bool = False
    needs: tuple[str, ...] = ()

    def applies(self, layer: nn.Module, flags: Iterable[str] = ()) -> bool:
        return (weight_kind(layer) in self.kinds and (self.dtypes is None or act_dtype(layer) in self.dtypes)
                and (not self.needs or any(f in flags for f in self.needs)))

    def __call__(self, layer: nn.Module, x: Tensor) -> Tensor:
        return self.fn(layer, x)


def _bias(layer: nn.Module, y: Tensor) -> Tensor:
    return y if layer.bias is None else y + layer.bias


def _xwt(layer: nn.Module, x: Tensor) -> Tensor:
    return layer(x)


def _wxt(layer: nn.Module, x: Tensor) -> Tensor:
    """W @ x.T, transposed back into rows (made contiguous: a strided result sliced to fewer rows
    and reshaped made torch.export guard on the row count's parity)."""
    return _bias(layer, torch.mm(layer.weight, x.t()).t().contiguous())


def _padded(fn: Fn, rows: Callable[[int], int]) -> Fn:
    """fn on zero rows appended up to rows(m) (eager only: the count must be a number)."""
    def run(layer: nn.Module, x: Tensor) -> Tensor:
        m = x.shape[0]
        return fn(layer, F.pad(x, (0, 0, 0, rows(m) - m)))[:m]
    return run


def _pow2_rows(m: int) -> int:
    """The main branch's rule until 2026-12 (eager float32): 2, 4, 8, 16 rows, then multiples of 16 up to 64."""
    if m > 64:
        return m
    return max(2, 1 << (m - 1).bit_length()) if m <= 16 else -(-m // 16) * 16


def _even(layer: nn.Module, x: Tensor) -> Tensor:
    """W @ x.T with an odd row count padded to even: no guard on a symbolic count."""
    m = x.shape[0]
    return _wxt(layer, F.pad(x, (0, 0, 0, m % 2)))[:m]


def _blocks(block: int, weights_left: bool) -> Fn:
    """Zero rows up to a multiple of `block`, then one batched GEMM of blocks of exactly `block`
    rows: every product has the same M whatever the row count. Eager only: with a symbolic
    row count, torch.export guards on the block count (torch 2.13), so compiled programs cannot
    take it."""
    def run(layer: nn.Module, x: Tensor) -> Tensor:
        m, k = x.shape
        xp = F.pad(x, (0, 0, 0, (-m) % block))
        nb = xp.shape[0] // block
        xb = xp.view(nb, block, k)
        w = layer.weight
        if weights_left:  # [nb, out, in] @ [nb, in, B] -> [nb, out, B]
            y = torch.bmm(w.expand(nb, *w.shape), xb.transpose(1, 2)).transpose(1, 2)
        else:  # [nb, B, in] @ [nb, in, out]
            y = torch.bmm(xb, w.t().expand(nb, *w.t().shape))
        return _bias(layer, y.flatten(0, 1)[:m])
    return run


def _rows_alone(layer: nn.Module, x: Tensor) -> Tensor:
    """Each row multiplied on its own: row-invariant by construction (every call is the same
    1-row product), at the cost of one pass over the weights per row. The fallback that always
    passes the gate."""
    return torch.cat([layer(x[j:j + 1]) for j in range(x.shape[0])])


def _onednn(layer: nn.Module, x: Tensor) -> Tensor:
    """oneDNN's linear (mkldnn), which prepacks the weight for the CPU's ISA and caches it."""
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")


ANY = ("float", "int8", "int4")
CANDIDATES: tuple[Tactic, ...] = (
    Tactic("x@W.T", _xwt, ANY, export_safe=True),
    Tactic("x@W.T pad2", _padded(_xwt, lambda m: max(m, 2)), ANY),
    Tactic("x@W.T pad4", _padded(_xwt, lambda m: m + 4 - m % 4 if m >= 2 and m % 4 >= 2 else m), ANY),
    Tactic("x@W.T blk4", _blocks(4, False)),
    Tactic("x@W.T blk8", _blocks(8, False)),
    Tactic("W@x.T", _wxt, export_safe=True),
    Tactic("W@x.T pad2", _padded(_wxt, lambda m: max(m, 2))),
    Tactic("W@x.T pow2", _padded(_wxt, _pow2_rows), dtypes=(torch.float32,)),
    Tactic("W@x.T even", _even, dtypes=(torch.float32,), export_safe=True),
    Tactic("W@x.T blk2", _blocks(2, True)),
    Tactic("W@x.T blk4", _blocks(4, True)),
    Tactic("oneDNN", _onednn, dtypes=(torch.float32,)),
    Tactic("oneDNN bf16", _onednn, dtypes=(torch.bfloat16,), needs=("avx512_bf16", "amx_bf16")),
    Tactic("rows alone", _rows_alone, ANY),
)
BY_NAME = {t.name: t for t in CANDIDATES}


# ---------------------------------------------------------------------------- the gate


@dataclass
class Verdict:
    admitted: bool
    reason: str = ""
    family: str = ""  # digest of the bits it gives rows multiplied alone


def reference(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(float64 product, bound on its rounding error) for layer(x)."""
    w = layer.weight if isinstance(layer, nn.Linear) else layer.dequantized_weight()
    w64, x64 = w.double(), x.double()
    y = x64 @ w64.t()
    if getattr(layer, "bias", None) is not None:
        y = y + layer.bias.double()
    eps = torch.finfo(x.dtype).eps
    bound = (x.shape[1] * eps + 2 * eps) * (x64.abs() @ w64.abs().t()) + eps
    return y, bound


def gate(tactic: Tactic | Fn, layer: nn.Module, rows: Iterable[int], x: Tensor | None = None) -> Verdict:
    """Admit `tactic` for `layer` if, for every row count in `rows`, its product is close to the
    float64 one and each row has the bits it gets multiplied alone (compared bitwise)."""
    rows = sorted(set(rows))
    if x is None:
        g = torch.Generator().manual_seed(GATE_SEED)
        x = torch.randn(rows[-1], layer.in_features, generator=g).to(act_dtype(layer))
    try:
        with torch.inference_mode():
            alone = torch.cat([tactic(layer, x[j:j + 1]) for j in range(rows[-1])])
            want, bound = reference(layer, x[:rows[-1]])
            if alone.shape != want.shape or alone.dtype != x.dtype:
                return Verdict(False, f"gives {tuple(alone.shape)} {alone.dtype}, "
                                      f"expected {tuple(want.shape)} {x.dtype}")
            if not ((alone.double() - want).abs() <= bound).all():
                return Verdict(False, "not close to the float64 product")
            for m in rows:
                if not torch.equal(tactic(layer, x[:m]), alone[:m]):
                    return Verdict(False, f"row-variant: {m} rows at once differ from each row alone")
    except (RuntimeError, NotImplementedError) as e:
        return Verdict(False, f"fails: {str(e).splitlines()[0][:120]}")
    return Verdict(True, family=hashlib.sha256(alone.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:12])


def gate_rows(buckets: list[int]) -> list[int]:
    """The row counts the gate checks: every count up to 16 that the buckets cover, then each
    bucket's bound and the count right above the bound below it (the two ends of its range).
    Counts in between run the same tactic with the same padding or block layout."""
    top = buckets[-1]
    rows = set(range(1, min(top, 16) + 1))
    for lo, hi in zip([0, *buckets], buckets):
        rows |= {lo + 1, hi}
    return sorted(rows)


# ---------------------------------------------------------------------------- timing

Timer = Callable[[Callable[[], Any]], float]


def wall_timer(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(tactics: list[Tactic], layers: list[nn.Module], rows: int, timer: Timer = wall_timer,
            reps: int = 5) -> dict[str, float]:
    """Median seconds of each tactic over all `layers` (a model's layers of one shape, so that
    the weights stream from memory as in a real step), the tactics interleaved rep by rep with
    a rotating start, so that a load change falls on all of them."""
    g = torch.Generator().manual_seed(GATE_SEED)
    x = torch.randn(rows, layers[0].in_features, generator=g).to(act_dtype(layers[0]))
    times: dict[str, list[float]] = {t.name: [] for t in tactics}
    with torch.inference_mode():
        for t in tactics:  # warm-up: first-call allocations, oneDNN's packing
            t(layers[0], x)
        for r in range(reps):
            k = r % len(tactics)
            for t in tactics[k:] + tactics[:k]:
                times[t.name].append(timer(lambda t=t: [t(layer, x) for layer in layers]))
    return {n: statistics.median(v) for n, v in times.items()}


# ---------------------------------------------------------------------------- plans


@dataclass
class ShapePlan:
    """One weight shape's tactics: `tactics[i]` for row counts up to `buckets[i]` (above the
    last: layer(x)); `compiled` for traced programs. ms: median milliseconds per bucket and
    candidate; rejected: why each refused candidate was."""
    buckets: list[int]
    tactics: list[str]
    compiled: str
    family: str = ""
    ms: dict[str, dict[str, float]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    layers: int = 0

    def bind(self, tactics: dict[str, Tactic] | None = None) -> "Bound":
        """The tactics themselves, looked up by name in `tactics` (default: CANDIDATES)."""
        tactics = tactics or BY_NAME
        return Bound(tuple(self.buckets), tuple(tactics[n] for n in self.tactics), tactics[self.compiled])


@dataclass(frozen=True)
class Bound:
    """What a layer carries (`layer.tactics`, read by runtime.model.rows_linear)."""
    buckets: tuple[int, ...]
    tactics: tuple[Tactic, ...]
    compiled: Tactic

    def for_rows(self, m: int) -> Tactic | None:
        for bound, tactic in zip(self.buckets, self.tactics):
            if m <= bound:
                return tactic
        return None


@dataclass
class Plan:
    signature: dict[str, Any]
    mode: str
    shapes: dict[str, ShapePlan]

    def to_json(self) -> dict[str, Any]:
        return {"signature": self.signature, "signature_id": signature_id(self.signature), "mode": self.mode,
                "shapes": {k: asdict(v) for k, v in self.shapes.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plan":
        shapes = {k: ShapePlan(**v) for k, v in d["shapes"].items()}
        unknown = sorted({n for s in shapes.values() for n in (*s.tactics, s.compiled)} - set(BY_NAME))
        if unknown:
            raise ValueError(f"the plan names tactics this redrafter does not have ({unknown[:3]}): re-tune it")
        return cls(d["signature"], d.get("mode", "measure"), shapes)

    def table(self) -> str:
        """The plan as a markdown table: each shape and bucket, the tactic kept, every timing."""
        lines = [f"tactics for {self.signature['cpu']} ({', '.join(self.signature['flags']) or 'no listed flags'}; "
                 f"{self.signature['threads']} threads, torch {self.signature['torch']}; mode {self.mode})",
                 "| shape | rows | tactic | candidates (ms over the shape's layers) |", "|---|---|---|---|"]
        for key, s in self.shapes.items():
            lo = 0
            for bound, name in zip(s.buckets, s.tactics):
                ms = s.ms.get(str(bound), {})
                cands = ", ".join(f"{n} {v:.2f}" for n, v in sorted(ms.items(), key=lambda kv: kv[1]))
                rows = str(bound) if bound == lo + 1 else f"{lo + 1}-{bound}"
                lines.append(f"| {key} x{s.layers} | {rows} | {name} | {cands or 'untimed'} |")
                lo = bound
            lines.append(f"| {key} x{s.layers} | compiled | {s.compiled} | |")
            for n, why in s.rejected.items():
                lines.append(f"| {key} x{s.layers} | rejected | {n} | {why} |")
        return "\n".join(lines)


def shape_key(layer: nn.Module) -> str:
    bias = " +bias" if getattr(layer, "bias", None) is not None else ""
    dtype = str(act_dtype(layer)).removeprefix("torch.")
    return f"{weight_kind(layer)} {dtype} {layer.in_features}x{layer.out_features}{bias}"


def linear_groups(*modules: nn.Module | None) -> dict[str, list[nn.Module]]:
    """The linear layers rows_linear multiplies (float and quantized), grouped by shape_key."""
    groups: dict[str, list[nn.Module]] = {}
    seen: set[int] = set()
    for module in modules:
        if module is None:
            continue
        for m in module.modules():
            if id(m) in seen or not hasattr(m, "in_features") or not hasattr(m, "out_features"):
                continue
            if weight_kind(m) in ANY and m.weight.device.type == "cpu":
                seen.add(id(m))
                groups.setdefault(shape_key(m), []).append(m)
    return groups


def row_buckets(max_rows: int, tree_sizes: Iterable[int] = ()) -> list[int]:
    """Row-count bounds: 1 (plain decoding), each tree size a step verifies, powers of two up to
    max_rows (batches), and max_rows."""
    max_rows = max(1, max_rows)
    out = {1, max_rows} | {t for t in tree_sizes if 1 <= t <= max_rows}
    p = 2
    while p < max_rows:
        out.add(p)
        p *= 2
    return sorted(out)


def choose(verdicts: dict[str, Verdict], ms: dict[str, dict[str, float]] | None, buckets: list[int],
           order: list[str], export_safe: set[str]) -> tuple[list[str], str, str]:
    """(tactic per bucket, compiled tactic, family) from the admitted candidates. With timings:
    the family whose fastest members sum to the least over the buckets; without: the family of
    the first admitted candidate in `order`, and in it the first in `order` per bucket."""
    admitted = [n for n in order if n in verdicts and verdicts[n].admitted]
    if not admitted:
        raise RuntimeError("no candidate tactic passed the gate: " +
                           "; ".join(f"{n}: {v.reason}" for n, v in verdicts.items()))
    families: dict[str, list[str]] = {}
    for n in admitted:
        families.setdefault(verdicts[n].family, []).append(n)

    def best(members: list[str], bound: int) -> str:
        return min(members, key=lambda n: ms[str(bound)][n]) if ms else members[0]

    def total(members: list[str]) -> float:
        return sum(ms[str(b)][best(members, b)] for b in buckets)

    family = min(families, key=lambda f: total(families[f])) if ms else verdicts[admitted[0]].family
    tactics = [best(families[family], b) for b in buckets]
    safe = [n for n in admitted if n in export_safe]
    if not safe:
        compiled = "x@W.T"
    elif ms:
        compiled = min(safe, key=lambda n: sum(ms[str(b)][n] for b in buckets))
    else:
        compiled = safe[0]
    return tactics, compiled, family


def tune_shape(layers: list[nn.Module], buckets: list[int], *, candidates: Iterable[Tactic] = CANDIDATES,
               timer: Timer | None = wall_timer, reps: int = 5, flags: Iterable[str] | None = None) -> ShapePlan:
    """Gate every candidate that applies to these layers (one shape), time the admitted ones at
    every bucket (timer None: untimed, "gate" mode) and keep the fastest row-invariant plan."""
    flags = set(machine_signature()["flags"] if flags is None else flags)
    cands = [c for c in candidates if c.applies(layers[0], flags)]
    rows = gate_rows(buckets)
    verdicts = {c.name: gate(c, layers[0], rows) for c in cands}
    ok = [c for c in cands if verdicts[c.name].admitted]
    ms = None
    if timer is not None and ok:
        ms = {str(b): {n: s * 1e3 for n, s in measure(ok, layers, b, timer, reps).items()} for b in buckets}
    tactics, compiled, family = choose(verdicts, ms, buckets, [c.name for c in cands],
                                       {c.name for c in cands if c.export_safe})
    rejected = {n: v.reason for n, v in verdicts.items() if not v.admitted}
    if compiled not in verdicts or not verdicts[compiled].admitted:
        rejected["(compiled)"] = (f"no export-safe candidate passed the gate: compiled programs run {compiled}, "
                                  "which is not row-invariant here (use --backend eager for a lossless engine)")
    return ShapePlan(buckets, tactics, compiled, family, ms or {}, rejected, len(layers))


EPYC_RULE = "epyc-rule"


def fixed_plan(groups: dict[str, list[nn.Module]], name: str, buckets: list[int]) -> dict[str, ShapePlan]:
    """`name` for every shape it applies to (x@W.T elsewhere), ungated: for experiments.
    EPYC_RULE reproduces the rule hard-coded until 2026-12 (measured on an AMD EPYC), to compare
    against: float32 W@x.T on 2, 4, 8, 16, 32, 48, 64 rows (odd counts padded to even in compiled
    programs), bfloat16 x@W.T with 2-3 (mod 4) rows padded to 4, quantized layers as they are."""
    if name != EPYC_RULE and name not in BY_NAME:
        raise ValueError(f"{MODE_ENV}={name!r} is not a tactic: use measure, gate, {EPYC_RULE}, or one of "
                         f"{', '.join(BY_NAME)}")
    flags = machine_signature()["flags"]
    out = {}
    for key, layers in groups.items():
        eager = compiled = name
        if name == EPYC_RULE:
            eager, compiled = "x@W.T", "x@W.T"
            if weight_kind(layers[0]) == "float" and act_dtype(layers[0]) == torch.float32:
                eager, compiled = "W@x.T pow2", "W@x.T even"
            elif weight_kind(layers[0]) == "float" and act_dtype(layers[0]) == torch.bfloat16:
                eager = "x@W.T pad4"
        if not BY_NAME[eager].applies(layers[0], flags):
            eager = "x@W.T"
        if not (BY_NAME[compiled].export_safe and BY_NAME[compiled].applies(layers[0], flags)):
            compiled = "x@W.T"
        out[key] = ShapePlan(buckets, [eager] * len(buckets), compiled, layers=len(layers))
    return out


def mode() -> str:
    return os.environ.get(MODE_ENV, "measure") or "measure"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "redrafter") / "tactics"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        warnings.warn(f"ignoring the unreadable tactic cache {str(path)!r} ({e}): measuring again", stacklevel=3)
        return {}


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def plan_for(*modules: nn.Module | None, max_rows: int, tree_sizes: Iterable[int] = (),
             use_cache: bool = True, how: str | None = None, progress: Callable[[str], None] | None = None) -> Plan:
    """The plan for these modules' linears on this machine: from the per-machine cache where it
    has their shapes at these buckets, else tuned (and added to the cache, written atomically)."""
    how = how or mode()
    sig = machine_signature()
    buckets = row_buckets(max_rows, tree_sizes)
    groups = linear_groups(*modules)
    if how not in ("measure", "gate"):
        return Plan(sig, how, fixed_plan(groups, how, buckets))
    path = cache_dir() / f"{signature_id(sig)}.json"
    cached = _read_cache(path) if use_cache else {}
    entries = cached.get("entries", {}) if cached.get("signature") == sig else {}
    shapes, new = {}, False
    for key, layers in groups.items():
        entry = f"{how} {key} rows {','.join(map(str, buckets))} x{len(layers)}"
        try:
            shapes[key] = ShapePlan(**entries[entry])
            shapes[key].bind()
            continue
        except (KeyError, TypeError):
            pass
        if how == "measure" and not new:  # once per machine and shape: say why this start is slower
            log.warning("measuring this machine's linear tactics (once; cached in %s)", path.parent)
        if progress:
            progress(f"tuning {key} ({len(layers)} layers, rows {buckets})")
        shapes[key] = tune_shape(layers, buckets, timer=wall_timer if how == "measure" else None)
        entries[entry] = asdict(shapes[key])
        new = True
    if new and use_cache:
        try:
            _write_atomic(path, {"signature": sig, "entries": entries})
        except OSError as e:
            warnings.warn(f"could not write the tactic cache {str(path)!r} ({e}): the plan is measured again "
                          f"next time (set {CACHE_ENV} to a writable directory)", stacklevel=2)
    return Plan(sig, how, shapes)


def apply_plan(plan: Plan, *modules: nn.Module | None) -> None:
    """Give every linear of `modules` its shape's tactics (layers of shapes the plan lacks keep layer(x))."""
    for key, layers in linear_groups(*modules).items():
        bound = plan.shapes[key].bind() if key in plan.shapes else None
        for layer in layers:
            layer.tactics = bound


def use_plan(*modules: nn.Module | None, max_rows: int, tree_sizes: Iterable[int] = (),
             progress: Callable[[str], None] | None = None) -> Plan:
    """plan_for + apply_plan: what the eager runtime calls once its decoder's shapes are known."""
    plan = plan_for(*modules, max_rows=max_rows, tree_sizes=tree_sizes, progress=progress)
    apply_plan(plan, *modules)
    return plan


def engine_plan(recorded: dict[str, Any] | None, *modules: nn.Module | None, max_rows: int,
                tree_sizes: Iterable[int] = (), where: str = "this engine") -> Plan:
    """The plan an engine runs with: the one recorded at build time if it was measured on a
    machine with this signature, else (with a warning when one was recorded) this machine's own."""
    sig = machine_signature()
    if recorded is not None:
        theirs = recorded.get("signature") or {}
        if theirs == sig:
            plan = Plan.from_json(recorded)
            apply_plan(plan, *modules)
            return plan
        diff = sorted(k for k in set(sig) | set(theirs) if sig.get(k) != theirs.get(k))
        there = ", ".join(f"{k}: {theirs.get(k)!r}" for k in diff)
        here = ", ".join(f"{k}: {sig.get(k)!r}" for k in diff)
        warnings.warn(f"{where} was tuned on another machine ({there}; here: {here}): re-tuning its eager linears "
                      "for this machine. Compiled programs keep the tactics traced at build time: rebuild the "
                      "engine here (`redrafter build`) for a plan measured on this machine.", stacklevel=2)
    return use_plan(*modules, max_rows=max_rows, tree_sizes=tree_sizes)
