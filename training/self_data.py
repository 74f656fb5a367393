"""Self-distillation data: the base model's own greedy answers to training prompts.

At inference the drafter continues the base model's *own* greedy output, not human text.
Training on answers the base model generated itself (first user turns of the training
split, answered greedily by the runtime) matches that distribution exactly, which matters
most for small base models whose style differs from ShareGPT's GPT-4 answers. Written as
ShareGPT-style JSONL, so `redrafter train --data FILE` consumes it unchanged; records are
appended as they finish, so an interrupted run keeps its work and resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import queue
from pathlib import Path

from tqdm import tqdm

from redrafter.datasets import load_conversations, split
from .trainer import check_device


def training_prompts(data: str | Path, seed: int, max_prompt_tokens: int,
                     tokenizer_encode) -> list[tuple[int, str, list[int]]]:
    """(index, first user turn, its rendered prompt's ids) of the training split, for the
    prompts that fit max_prompt_tokens."""
    train, _ = split(load_conversations(data), seed)
    out = []
    for i, conv in enumerate(train):
        first = next((m["content"] for m in conv if m["role"] == "user"), None)
        ids = tokenizer_encode(first) if first else []
        if ids and len(ids) <= max_prompt_tokens:
            out.append((i, first, ids))
    return out


def generate_answers(output: str | os.PathLike, base: str = "default", data: str | Path = "sharegpt",
                     max_samples: int = 1000, max_new_tokens: int = 192, max_prompt_tokens: int = 256,
                     batch_size: int = 16, seed: int = 0, device: str = "cpu") -> Path:
    """Answer up to max_samples training prompts greedily and append them to `output` (JSONL)."""
    from redrafter.runtime.pipeline import encode_chat
    from redrafter.runtime.session import SamplingParams, Session

    if max_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_samples, max_new_tokens and batch_size must be >= 1")
    out = Path(output)
    done = set()
    if out.exists():
        text = out.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a record cut by an interruption: drop it, it is answered again
            text = text[: text.rfind("\n") + 1]
            out.write_text(text, encoding="utf-8")
        for line in text.split("\n"):
            if line.strip():
                done.add(json.loads(line)["source_index"])
    check_device(device)
    session = Session.load(base=base, drafter=None, max_batch_size=batch_size,
                           max_seq_len=max_prompt_tokens + 64 + max_new_tokens, device=device)
    try:
        prompts = training_prompts(data, seed, max_prompt_tokens,
                                   lambda text: encode_chat(session.tokenizer, text))[:max_samples]
        todo = [(i, p, ids) for i, p, ids in prompts if i not in done]
        params = SamplingParams(max_new_tokens=max_new_tokens)
        answers: queue.SimpleQueue = queue.SimpleQueue()

        def collect(i: int, prompt: str):
            pieces: list[str] = []

            def on_delta(d) -> None:
                pieces.append(d.text)
                if d.finished:
                    answers.put((i, prompt, "".join(pieces), d.error))
            return on_delta

        # Every prompt is queued at once and each answer is written as it finishes, so the
        # session's slots stay full to the end, and an interruption loses only unfinished answers.
        for i, prompt, ids in todo:  # the ids, encoded once above
            session.submit(ids, params, collect(i, prompt))
        with out.open("a", encoding="utf-8") as f, tqdm(total=len(prompts), initial=len(prompts) - len(todo),
                                                         desc="self-distillation answers") as bar:
            for _ in todo:
                i, prompt, answer, error = answers.get()
                if error:
                    raise RuntimeError(f"answering training prompt {i} failed: {error}")
                f.write(json.dumps({"source_index": i, "conversations": [
                    {"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}) + "\n")
                f.flush()
                bar.update(1)
    finally:
        session.close()
    return out
