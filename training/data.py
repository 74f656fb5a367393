"""Training conversations: loading, a seeded held-out split, and chat-template tokenization.

Conversations are rendered with the base model's own chat template, exactly as the runtime
renders a prompt (`Loaded.encode_chat`), so the drafter trains on the token stream it sees at
inference. Each assistant turn is tokenized as its own segment after the rendered prompt;
the assistant mask marks the tokens the base model would generate.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from redrafter.runtime.atomic import atomic_file
from redrafter.datasets import Message, is_tokenized, load_conversations, split

@dataclass
class Tokenized:
    ids: np.ndarray        # [T] int32 token ids
    assistant: np.ndarray  # [T] bool, True where the base model generates the token


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
    with atomic_file(path) as tmp:
        np.savez(tmp, **arrays)
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
