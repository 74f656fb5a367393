"""Where the benchmark's figures go: a terminal table, a JSON file, a PNG plot, machine info."""
from __future__ import annotations

import io
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from redrafter.runtime.atomic import atomic_file


def machine_info(threads: int) -> dict:
    """What a figure depends on: the machine signature tactics are measured against, and more."""
    from redrafter.runtime.tactics import machine_signature

    signature = machine_signature()
    return {
        "cpu": signature["cpu"], "cpu_flags": signature["flags"], "cores": os.cpu_count(), "threads": threads,
        "torch": torch.__version__, "transformers": _version("transformers"),
        "llama_cpp_python": _version("llama-cpp-python"), "python": platform.python_version(),
        "platform": platform.platform(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average": load_average(), **_git_state(),
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load: on a shared machine, how much else was running."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_state() -> dict:
    """The checkout's commit, and whether tracked files differ from it (figures may not match HEAD)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(dirty)}


def table(results: list[dict]) -> str:
    """A plain fixed-width table, one row per (system, batch size)."""
    head = ["system", "B", "tok/s", "decode tok/s", "TTFT ms", "tok/step", "accept@1..L-1", "speedup", "vs plain"]
    rows = [head]
    for r in results:
        acc = r["acceptance_by_position"]
        if r["identical"] is not None:
            check = "identical" if r["identical"] else f"MISMATCH x{len(r['mismatches'])}"
        else:
            check = f"agree {r['agreement']['exact']:.0%}" if r["agreement"] else "-"
        rows.append([
            r["label"], str(r["batch_size"]), f"{r['tok_per_s']:.1f}", _num(r["decode_tok_per_s"], ".1f"),
            f"{1000 * r['ttft_s']:.0f}", _num(r["tokens_per_step"], ".2f"),
            "/".join(f"{a:.2f}" for a in acc) if acc else "-", _num(r["speedup"], ".2f", "x"), check,
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _num(x: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Readers never see half a file (runtime.atomic)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, report: dict) -> None:
    write_atomic(path, (json.dumps(report, indent=2) + "\n").encode())


def write_plot(path: str | os.PathLike, results: list[dict], title: str) -> None:
    """Left: end-to-end tok/s by system and batch size. Right: tokens per step by (W, L)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    labels = list(dict.fromkeys(r["label"] for r in results))
    batches = sorted({r["batch_size"] for r in results})
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs, ys = [], []
        for j, b in enumerate(batches):
            hit = [r for r in results if r["label"] == label and r["batch_size"] == b]
            if hit:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(hit[0]["tok_per_s"])
        left.bar(xs, ys, width, label=label)
    left.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    left.set_ylabel("generated tokens / s (end to end)")
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3)

    spec = [r for r in results if r["system"] == "redrafter" and r["batch_size"] == batches[0]]
    if spec:
        names = [r["label"].removeprefix("redrafter ") for r in spec]
        bars = right.bar(names, [r["tokens_per_step"] or 0.0 for r in spec], color="tab:green")
        right.bar_label(bars, [f"{r['speedup']:.2f}x" for r in spec], fontsize=8)
        right.axhline(1.0, color="grey", lw=0.8, ls="--")
        right.set_ylabel(f"tokens per step (batch {batches[0]}); bar labels: speedup")
    else:
        right.text(0.5, 0.5, "no ReDrafter configuration measured", ha="center", va="center",
                   transform=right.transAxes)
    right.set_xlabel("beam width W, beam length L")
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue())
