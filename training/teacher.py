"""The teacher cache: the frozen base model's outputs over the training tokens, computed once.

The draft head never changes the base model, so its inputs (final-norm hidden states) and
the distillation labels (the base model's greedy next token at every position) are computed
once with the runtime model and stored on disk, memory-mapped:

  tokens.npy [N] int32, assistant.npy [N] bool, ends.npy [N] int32 (end of each token's sequence),
  hidden.f16 [N, H] float16, argmax.i32 [N] int32, meta.json, done-<rank>.txt (finished batches).

Sequences are concatenated. Batches are written in place as they finish, so an interrupted
build resumes where it stopped; several worker processes can share the batches.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import Tokenized
from redrafter.runtime.atomic import atomic_file

_TOKENS_PER_BATCH = 1024
_TOKENS_PER_BATCH_GPU = 32768


@dataclass
class TeacherCache:
    tokens: np.ndarray     # [N] int32
    assistant: np.ndarray  # [N] bool
    ends: np.ndarray       # [N] int32: index one past the last token of this token's sequence
    hidden: np.ndarray     # [N, H] float16 (memory-mapped)
    argmax: np.ndarray     # [N] int32: the base model's greedy prediction of the next token

    def __len__(self) -> int:
        return len(self.tokens)


def fingerprint(base_dir: Path, sequences: list[Tokenized]) -> str:
    """Identifies the base model (config + weight file sizes) and the exact token stream."""
    h = hashlib.sha256((Path(base_dir) / "config.json").read_bytes())
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    for s in sequences:
        h.update(s.ids.tobytes())
        h.update(s.assistant.tobytes())
    return h.hexdigest()[:16]


def _batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices (longest first) so each padded batch has about max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def build_teacher_cache(base_dir: Path, sequences: list[Tokenized], cache_dir: Path, workers: int = 1,
                        progress: bool = True, device: str = "cpu") -> TeacherCache:
    """Compute (or reuse, or finish) the cache for these sequences in cache_dir, running the
    base model on `device` (on CUDA with TF32 matmuls: the cache stores float16 anyway)."""
    if not sequences or not any(s.assistant.any() for s in sequences):
        raise ValueError("no assistant tokens to train on: the dataset is empty after tokenization")
    cache_dir = Path(cache_dir)
    key = fingerprint(base_dir, sequences)
    meta_file = cache_dir / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()).get("fingerprint") != key:
        raise ValueError(f"teacher cache {str(cache_dir)!r} was built for other data or another base model: "
                         "delete it or choose another --cache-dir")
    lengths = [len(s.ids) for s in sequences]
    n = sum(lengths)
    hidden_size = json.loads((Path(base_dir) / "config.json").read_text())["hidden_size"]
    if not meta_file.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        offsets = np.cumsum([0] + lengths)
        ends = np.repeat(offsets[1:], lengths).astype(np.int32)
        np.save(cache_dir / "tokens.npy", np.concatenate([s.ids for s in sequences]).astype(np.int32))
        np.save(cache_dir / "assistant.npy", np.concatenate([s.assistant for s in sequences]))
        np.save(cache_dir / "ends.npy", ends)
        np.memmap(cache_dir / "hidden.f16", np.float16, "w+", shape=(n, hidden_size)).flush()
        np.memmap(cache_dir / "argmax.i32", np.int32, "w+", shape=(n,)).flush()
        meta = {"fingerprint": key, "base_dir": str(base_dir), "tokens": n, "sequences": len(sequences),
                "hidden_size": hidden_size, "complete": False}
        _write_json(meta_file, meta)
    meta = json.loads(meta_file.read_text())
    if not meta["complete"]:
        batches = _batches(lengths, _TOKENS_PER_BATCH if device == "cpu" else _TOKENS_PER_BATCH_GPU)
        done = _done_batches(cache_dir)
        todo = [b for b in range(len(batches)) if b not in done]
        threads = max(1, torch.get_num_threads() // workers)  # the workers share the threads, not multiply them
        args = [(base_dir, sequences, cache_dir, batches, todo[r::workers], n, hidden_size, threads,
                 progress and r == 0, device)
                for r in range(workers)]
        if workers == 1:
            _work(0, *args[0])
        else:
            ctx = multiprocessing.get_context("spawn")
            procs = [ctx.Process(target=_work, args=(r, *a)) for r, a in enumerate(args)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            if any(p.exitcode for p in procs):
                raise RuntimeError("a teacher worker failed; rerun to resume the cache build")
        if len(_done_batches(cache_dir)) != len(batches):
            raise RuntimeError("the teacher cache is incomplete; rerun to resume it")
        meta["complete"] = True
        _write_json(meta_file, meta)
    return open_teacher_cache(cache_dir)


def concat_caches(caches: list[TeacherCache]) -> TeacherCache:
    """One cache over several (shards of consecutive sequences); more than one is read into memory."""
    if len(caches) == 1:
        return caches[0]
    offsets = np.cumsum([0] + [len(c) for c in caches[:-1]])
    return TeacherCache(
        tokens=np.concatenate([c.tokens for c in caches]), assistant=np.concatenate([c.assistant for c in caches]),
        ends=np.concatenate([c.ends + o for c, o in zip(caches, offsets)]).astype(np.int32),
        hidden=np.concatenate([c.hidden for c in caches]), argmax=np.concatenate([c.argmax for c in caches]))


def open_teacher_cache(cache_dir: Path) -> TeacherCache:
    meta = json.loads((Path(cache_dir) / "meta.json").read_text())
    n, h = meta["tokens"], meta["hidden_size"]
    return TeacherCache(
        tokens=np.load(cache_dir / "tokens.npy"), assistant=np.load(cache_dir / "assistant.npy"),
        ends=np.load(cache_dir / "ends.npy"),
        hidden=np.memmap(cache_dir / "hidden.f16", np.float16, "c", shape=(n, h)),  # "c": torch can view it
        argmax=np.array(np.memmap(cache_dir / "argmax.i32", np.int32, "r", shape=(n,))),
    )


def _done_batches(cache_dir: Path) -> set[int]:
    done: set[int] = set()
    for f in cache_dir.glob("done-*.txt"):
        done.update(int(x) for x in f.read_text().split())
    return done


def _work(rank: int, base_dir: Path, sequences: list[Tokenized], cache_dir: Path, batches: list[list[int]],
          todo: list[int], n: int, hidden_size: int, threads: int, progress: bool, device: str = "cpu") -> None:
    """Run the base model over this worker's batches and write hidden states and argmax in place."""
    from tqdm import tqdm

    from redrafter.runtime.loading import load_base
    from redrafter.runtime.model import causal_mask

    torch.set_num_threads(threads)
    model, _ = load_base(base_dir, device=device)
    offsets = np.cumsum([0] + [len(s.ids) for s in sequences])
    hidden_mm = np.memmap(cache_dir / "hidden.f16", np.float16, "r+", shape=(n, hidden_size))
    argmax_mm = np.memmap(cache_dir / "argmax.i32", np.int32, "r+", shape=(n,))
    longest = max((len(sequences[batches[b][0]].ids) for b in todo), default=1)
    cache = model.new_cache(max(len(batches[b]) for b in todo) if todo else 1, longest)
    tokens_todo = sum(len(sequences[i].ids) for b in todo for i in batches[b])
    bar = tqdm(total=tokens_todo, unit="tok", desc="teacher", disable=not progress, mininterval=5)
    dev = model.embed.weight.device
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # CUDA only; restored after (the head may train in this process)
    try:
        with open(cache_dir / f"done-{rank}-{os.getpid()}.txt", "a") as log, torch.inference_mode():
            for b in todo:
                rows = batches[b]
                t = len(sequences[rows[0]].ids)
                ids = torch.zeros(len(rows), t, dtype=torch.long)
                for r, i in enumerate(rows):
                    ids[r, : len(sequences[i].ids)] = torch.from_numpy(sequences[i].ids.astype(np.int64))
                ids = ids.to(dev)
                pos = torch.arange(t, device=dev)[None].expand(len(rows), t)
                slots = torch.arange(len(rows), device=dev)
                h = model(ids, pos, cache, slots, torch.zeros_like(slots), causal_mask(len(rows), t, dev))
                top = torch.cat([model.logits(part).argmax(-1) for part in h.split(4)])  # bounds the [B, T, V] logits
                for r, i in enumerate(rows):
                    m = len(sequences[i].ids)
                    hidden_mm[offsets[i]: offsets[i] + m] = h[r, :m].to(torch.float16).cpu().numpy()
                    argmax_mm[offsets[i]: offsets[i] + m] = top[r, :m].to(torch.int32).cpu().numpy()
                hidden_mm.flush()
                argmax_mm.flush()
                log.write(f"{b}\n")
                log.flush()
                bar.update(sum(len(sequences[i].ids) for i in rows))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    bar.close()


def _write_json(path: Path, obj: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))
