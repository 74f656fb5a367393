"""The decoders a benchmark compares, behind one call: prompts in, token ids and timings out.

Every system decodes the same prompt token ids (chat template applied) and stops after an
EOS token (kept) or `max_new_tokens`, so outputs line up token for token. Greedy runs of
ours go through `generate` (lockstep batch). Sampled runs of ours go through the serving
Session, whose seeded requests draw their n-th token from the n-th uniform of their own
stream: sampled ReDrafter output must then equal sampled plain output for the same seed.
"""
from __future__ import annotations

import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Callable

import torch

from redrafter.runtime.decoding import Decoder, generate


@dataclass
class Run:
    """One system on one group of prompts decoded together."""
    outputs: list[list[int]]  # generated ids per prompt (first token included)
    seconds: float  # wall time for the whole group
    first_token_s: list[float]  # per prompt: from the group's start to its first token
    accepted_per_step: list[list[int]] | None = None  # ours: accepted drafts of each step (any order)


@dataclass
class System(ABC):
    """A named decoder at one batch size. `name` is plain | redrafter | hf | llamacpp."""
    name: str
    batch_size: int
    beam_width: int | None = None
    beam_length: int | None = None
    lookup_ngram: int | None = None
    step_length: int | None = None  # the longest beam (the lookup beam may be longer than L)
    tree: str | None = None  # what a step verifies (runtime.config.TREES)
    group: str = ""  # the engine's name, where several are compared
    variant: str = ""  # an engine's "fused" (step program) or "unfused" greedy steps

    @property
    def label(self) -> str:
        label = self.name
        if self.name == "redrafter":
            lookup = f" +lookup{self.lookup_ngram}" if self.lookup_ngram else ""
            if self.lookup_ngram and self.step_length > self.beam_length:
                lookup += f" L{self.step_length}"
            tree = " search-tree" if self.tree == "search" else ""
            label = f"redrafter W{self.beam_width} L{self.beam_length}{tree}{lookup}"
        return " ".join(x for x in (self.group, label, self.variant) if x)

    @abstractmethod
    def __call__(self, prompts: list[list[int]], max_new_tokens: int, seeds: list[int]) -> Run:
        """Decode `prompts` (at most batch_size of them) together; seeds: one per prompt, for sampling."""

    def close(self) -> None:
        """Release what the system holds (threads, caches)."""


def _shape(decoder: Decoder) -> tuple[int | None, ...]:
    """(W, L, lookup n-gram, longest beam, tree) of a ReDrafter decoder; Nones for plain decoding."""
    if not decoder.speculative:
        return (None,) * 5
    c = decoder.config
    return c.beam_width, c.beam_length, c.lookup_ngram, c.step_length, c.tree


class OursSystem(System):
    """Our runtime, greedy: `generate` in lockstep over a Decoder (no drafter = plain decoding)."""

    def __init__(self, name: str, decoder: Decoder, batch_size: int, eos_ids: list[int]):
        super().__init__(name, batch_size, *_shape(decoder))
        self.decoder, self.eos_ids = decoder, eos_ids

    def __call__(self, prompts: list[list[int]], max_new_tokens: int, seeds: list[int]) -> Run:
        t0 = time.perf_counter()
        gens = generate(self.decoder, prompts, max_new_tokens, self.eos_ids)
        seconds = time.perf_counter() - t0
        # Prefill runs slot after slot, so slot i's first token arrives after i+1 prefills.
        first = list(accumulate(g.prefill_s for g in gens))
        return Run([g.token_ids for g in gens], seconds, first, [g.accepted_per_step for g in gens])


class SessionSystem(System):
    """Our runtime, sampling: a serving Session; the group's requests are submitted together."""

    def __init__(self, name: str, decoder: Decoder, batch_size: int, eos_ids: list[int], temperature: float):
        from redrafter.runtime.session import Session

        super().__init__(name, batch_size, *_shape(decoder))
        self.session = Session(decoder, None, eos_ids)  # no tokenizer: prompts are ids, nothing to detokenize
        self.temperature = temperature

    def __call__(self, prompts: list[list[int]], max_new_tokens: int, seeds: list[int]) -> Run:
        from redrafter.runtime.sampling import SamplingParams

        params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=self.temperature, seed=s) for s in seeds]
        t0 = time.perf_counter()
        outs = self.session.generate(prompts, params)
        seconds = time.perf_counter() - t0
        return Run([o.token_ids for o in outs], seconds, [o.metrics.ttft_s for o in outs],
                   [_accepted_per_step(o.metrics) for o in outs])

    def close(self) -> None:
        self.session.close()


def _accepted_per_step(m) -> list[int]:
    """Accepted drafts of each step (as a multiset) from a request's counts of steps accepting >= k."""
    at_least = [m.steps, *m.accepted_by_position, 0]
    return [k for k in range(len(at_least) - 1) for _ in range(at_least[k] - at_least[k + 1])]


class _FirstTokenClock:
    """A transformers streamer that only notes when the first generated tokens arrive."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first put is the prompt itself
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class HFSystem(System):
    """transformers `generate` on the same HF checkpoint (left-padded batches); greedy unless
    temperature > 0 (then plain temperature sampling, seeded with the group's first seed)."""

    def __init__(self, model, batch_size: int, eos_ids: list[int], pad_id: int, temperature: float):
        super().__init__("hf", batch_size)
        self.model, self.eos_ids, self.pad_id, self.temperature = model, eos_ids, pad_id, temperature

    @staticmethod
    def load(base_dir: Path, device: torch.device):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device).eval()

    @torch.inference_mode()
    def __call__(self, prompts: list[list[int]], max_new_tokens: int, seeds: list[int]) -> Run:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        sampling = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        if self.temperature > 0:
            torch.manual_seed(seeds[0])
            sampling = {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": 1.0}
        clock = _FirstTokenClock()
        t0 = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=mask, num_beams=1, max_new_tokens=max_new_tokens,
                                  eos_token_id=self.eos_ids, pad_token_id=self.pad_id, streamer=clock, **sampling)
        seconds = time.perf_counter() - t0
        return Run([_cut_at_eos(row, self.eos_ids) for row in out[:, width:].tolist()], seconds,
                   [clock.first - t0] * len(prompts))


LLAMACPP_BUILD = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON '
                  '-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install --force-reinstall '
                  '--no-cache-dir llama-cpp-python')


class PeerCrashed(RuntimeError):
    """A peer's process died (a signal or an exit without an answer): reported, not fatal."""


class LlamaCppSystem(System):
    """llama.cpp (llama-cpp-python) on the GGUF file itself: batch 1, same thread count;
    greedy unless temperature > 0 (then plain temperature sampling, seeded).

    It runs in a child process: llama-cpp-python built natively on a CPU with AMX segfaulted in
    prompt evaluation, and a crash there must end this peer (PeerCrashed, with how to rebuild
    it), not the whole benchmark. Timings are taken in the child, around decoding only."""

    def __init__(self, gguf: Path, n_ctx: int, threads: int, eos_ids: list[int], temperature: float,
                 worker: Callable[..., None] | None = None):
        import multiprocessing

        super().__init__("llamacpp", 1)
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=worker or _llamacpp_worker, daemon=True,
                                 args=(child, str(gguf), n_ctx, threads, sorted(eos_ids), temperature))
        self._proc.start()
        child.close()
        self._answer("loading the model")

    def __call__(self, prompts: list[list[int]], max_new_tokens: int, seeds: list[int]) -> Run:
        (prompt,) = prompts
        try:
            self._conn.send((prompt, max_new_tokens, seeds[0]))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child is gone: _answer says how
        out, seconds, first = self._answer("decoding")
        return Run([out], seconds, [first])

    def _answer(self, doing: str):
        try:
            msg = self._conn.recv()
        except (EOFError, ConnectionResetError):
            self._proc.join(timeout=10)
            code = self._proc.exitcode
            how = (signal.Signals(-code).name if code is not None and code < 0
                   else f"exit code {code}" if code is not None else "no answer")
            raise PeerCrashed(f"llama.cpp crashed while {doing} ({how}). A llama-cpp-python built for this CPU's AMX "
                              f"segfaults in prompt evaluation; rebuild it without AMX: {LLAMACPP_BUILD}") from None
        if isinstance(msg, dict):
            raise RuntimeError(f"llama.cpp failed while {doing}: {msg['error']}")
        return msg

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()


def _llamacpp_worker(conn, gguf: str, n_ctx: int, threads: int, eos_ids: list[int], temperature: float) -> None:
    """The child's loop: load the GGUF, then answer (prompt, max_new_tokens, seed) requests with
    (generated ids, seconds, seconds to the first token) until None."""
    try:
        from llama_cpp import Llama

        llm = Llama(model_path=gguf, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                    n_gpu_layers=0, verbose=False)
    except Exception as e:  # noqa: BLE001  (the parent raises it with its message)
        conn.send({"error": f"{type(e).__name__}: {e}"})
        return
    conn.send("ready")
    eos = set(eos_ids)
    # top_k=1 makes the greedy path explicit; 0 / 1.0 / 0.0 switch the filters off for sampling.
    top_k = 0 if temperature > 0 else 1
    while (request := conn.recv()) is not None:
        prompt, max_new_tokens, seed = request
        llm.reset()  # no prompt-prefix reuse between prompts: every system prefills in full
        llm.set_seed(seed)
        out: list[int] = []
        t0 = time.perf_counter()
        first = 0.0
        for tok in llm.generate(prompt, top_k=top_k, top_p=1.0, min_p=0.0, temp=temperature, repeat_penalty=1.0):
            if not out:
                first = time.perf_counter() - t0
            out.append(int(tok))
            if len(out) >= max_new_tokens or tok in eos:
                break
        conn.send((out, time.perf_counter() - t0, first))


def _cut_at_eos(row: list[int], eos_ids: list[int]) -> list[int]:
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return row[: i + 1]
    return row
