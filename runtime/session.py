"""Serving on top of the Decoder: in-flight batching, streaming, per-request sampling.

One loop thread owns the decoder. Each iteration it (1) retires cancelled requests,
(2) prefills waiting requests into free slots (FIFO, within a prompt-token budget),
(3) runs one decoder step for every running slot with the beam shape the policy picks
for that batch size, and (4) hands each request its new tokens; finished requests free
their slot at once, so a waiting request takes it in the next iteration. `submit` and
`cancel` may be called from any thread; callbacks run on the loop thread. The threads that
hand work to the loop (the constructor's, and generate's and stream's callers) first free
their idle OpenMP workers, and so does an idle loop, so that torch's CPU kernels run on the
pool of the loop that is working alone (runtime.openmp: two pools on a 2-core CPU made every
step about 2x slower).

Outputs: token_ids holds every generated token, a final EOS or stop token included (as
transformers does); text is the detokenized output without that token, cut before the
first stop string. Streaming never releases text that could still become a stop string.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .config import DecodeConfig
from .decoding import Decoder
from .metrics import RequestMetrics, SessionMetrics
from .openmp import release_openmp_threads
from .sampling import SamplingParams, SlotSampler
from .scheduler import BeamPolicy, MeasuredBeamPolicy, SlotScheduler

__all__ = ["Session", "SamplingParams", "RequestOutput", "StreamDelta", "BeamPolicy", "MeasuredBeamPolicy"]

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]
Policy = BeamPolicy | MeasuredBeamPolicy


@dataclass(frozen=True)
class StreamDelta:
    request_id: str
    token_ids: list[int]  # tokens new since the previous delta
    text: str  # text new since the previous delta
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error", with finished
    error: str | None = None  # what went wrong, with finish_reason "error"


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    metrics: RequestMetrics
    error: str | None = None


class _TextStream:
    """Incremental detokenization with stop strings.

    Decodes a small window of recent tokens and keeps what it adds over the window's
    already-read part, so tokenizers that strip a leading space from a lone token still
    join words correctly; a window ending in an incomplete UTF-8 sequence waits for more.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window: ids[prefix:read] already read, ids[read:] new
        self.text = ""
        self.sent = 0  # characters of text already released

    def push(self, token: int) -> bool:
        """Add a token; True when a stop string now appears (text is then cut before it)."""
        if self.tokenizer is None:
            return False
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        window = self._decode(self.ids[self.prefix:])
        if len(window) <= len(before) or window.endswith("\ufffd"):
            return False
        old = len(self.text)
        self.text += window[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return self._cut_at_stop(old)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _cut_at_stop(self, old_len: int) -> bool:
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, old_len - len(s) + 1))) >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        return True

    def release(self, final: bool) -> str:
        """Text that can be sent now; until final, hold back a tail that may start a stop string."""
        if final and self.read < len(self.ids):  # an incomplete character at the very end
            self.text += self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]
            self.read = len(self.ids)
        end = len(self.text) if final else len(self.text) - self._held()
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    def _held(self) -> int:
        tail = self.text[self.sent:]
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), held, -1):
                if tail.endswith(s[:k]):
                    held = k
                    break
        return held


class _Request:
    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int],
                 text: _TextStream, on_delta: Callable[[StreamDelta], None] | None):
        self.id, self.prompt, self.params, self.stop_ids = rid, prompt, params, stop_ids
        self.text, self.on_delta = text, on_delta
        self.arrival = time.perf_counter()
        self.token_ids: list[int] = []
        self.metrics = RequestMetrics(prompt_tokens=len(prompt))
        self.output: RequestOutput | None = None
        self.done = threading.Event()


class Session:
    """A serving session over one Decoder. Use as a context manager or call close()."""

    def __init__(self, decoder: Decoder, tokenizer: Any = None, eos_ids: Sequence[int] = (), *,
                 beam_policy: Policy | None = None, prefill_token_budget: int = 8192):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.max_seq_len = decoder.max_seq_len
        self.max_batch_size = decoder.cache.slots
        self.vocab_size = decoder.model.cfg.vocab_size
        self.beam_policy = beam_policy or BeamPolicy.fixed(decoder.config.beam_width, decoder.config.beam_length)
        w, l = self.beam_policy.largest_shape
        largest = decoder.config.with_shape(w, l)
        if decoder.drafter is not None and largest.tree_tokens > decoder.max_tree_tokens:
            raise ValueError(f"beam policy shape {w}x{l} needs {largest.tree_tokens} tree tokens but the "
                             f"decoder was built for {decoder.max_tree_tokens}: build it with the policy's largest "
                             "beam shape")
        self._sched: SlotScheduler[_Request] = SlotScheduler(self.max_batch_size, prefill_token_budget)
        self._lock = threading.Condition()
        self._live: dict[str, _Request] = {}
        self._cancels: set[str] = set()
        self._closed = False
        self._stats = SessionMetrics()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="redrafter-session", daemon=True)
        release_openmp_threads()  # this thread built the model; the loop thread runs it from now on
        self._thread.start()

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, base: str | os.PathLike = "default", drafter: str | os.PathLike | None = "default",
             max_batch_size: int = 8, max_seq_len: int = 2048, decode: DecodeConfig | None = None, *,
             beam_policy: Policy | str | None = None, dtype: torch.dtype = torch.float32,
             device: str = "cpu", prefill_token_budget: int = 8192) -> "Session":
        """A session over a base model and drafter (None: plain decoding); decode None: the device's
        default. beam_policy: None (always decode's W x L), "adaptive" (a MeasuredBeamPolicy over shapes
        up to W x L, plain decoding included) or a policy object. Engines: builder.engine.open_session."""
        from .pipeline import load

        loaded = load(base, drafter, dtype=dtype, device=device)
        decode = decode or DecodeConfig.for_device(device)
        policy = policy_for(beam_policy, decode)
        decoder = Decoder(loaded.model, loaded.drafter, decode.with_shape(*policy.largest_shape),
                          max_batch=max_batch_size, max_seq_len=max_seq_len)
        if torch.device(device).type == "cpu":  # this machine's linear tactics (measured once, cached)
            from .tactics import use_plan

            use_plan(loaded.model, max_rows=max_batch_size * decoder.max_tree_tokens,
                     tree_sizes=[decoder.max_tree_tokens])
        return cls(decoder, loaded.tokenizer, loaded.eos_ids, beam_policy=policy,
                   prefill_token_budget=prefill_token_budget)

    # ------------------------------------------------------------------ public API

    def submit(self, prompt: Prompt, params: SamplingParams | None = None,
               on_delta: Callable[[StreamDelta], None] | None = None, *, request_id: str | None = None) -> str:
        """Queue one request; returns its id. Invalid input raises ValueError here."""
        req = self._request(prompt, params, on_delta, request_id)
        self._enqueue([req])
        return req.id

    def cancel(self, request_id: str) -> bool:
        """Stop a request at the next iteration (its final delta says "cancelled").
        False when it is unknown or already finished."""
        with self._lock:
            if request_id not in self._live:
                return False
            self._cancels.add(request_id)
            self._lock.notify()
            return True

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (text: chat template applied; or token ids) to completion, batched
        with whatever else the session is serving. params: one for all, or one per prompt."""
        self._not_from_loop("generate")
        batch = [prompts] if _is_single_prompt(prompts) else list(prompts)
        if isinstance(params, SamplingParams) or params is None:
            params = [params] * len(batch)
        if len(params) != len(batch):
            raise ValueError(f"{len(batch)} prompts but {len(params)} SamplingParams: give one, or one per prompt")
        reqs = [self._request(p, sp, None, None) for p, sp in zip(batch, params)]  # validate all first
        release_openmp_threads()
        self._enqueue(reqs)
        try:
            for r in reqs:
                r.done.wait()
        except BaseException:
            for r in reqs:
                self.cancel(r.id)
            raise
        failed = [r.output for r in reqs if r.output.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"request {failed[0].request_id} failed: {failed[0].error}")
        return [r.output for r in reqs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Deltas of one request as they are produced. Leaving the loop early cancels it."""
        self._not_from_loop("stream")
        deltas: queue.SimpleQueue[StreamDelta] = queue.SimpleQueue()
        rid = self.submit(prompt, params, deltas.put)  # raises now, not at the first next()
        release_openmp_threads()

        def follow() -> Iterator[StreamDelta]:
            finished = False
            try:
                while not finished:
                    d = deltas.get()
                    finished = d.finished
                    yield d
            finally:
                if not finished:
                    self.cancel(rid)

        return follow()

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            return self._stats.snapshot(len(self._sched.running), len(self._sched.waiting)) | {
                "max_batch_size": self.max_batch_size, "beam_policy": self.beam_policy.as_dict()}

    def close(self) -> None:
        """Stop the loop thread; requests still queued or running finish as "cancelled"."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ validation

    def _request(self, prompt: Prompt, params: SamplingParams | None, on_delta, request_id: str | None) -> _Request:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__} "
                             "(use SamplingParams.from_dict for a dict)")
        ids = self._encode(prompt)
        if len(ids) + params.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                             f"the session's max_seq_len {self.max_seq_len}: shorten the prompt, lower "
                             "max_new_tokens, or open the session with a larger max_seq_len")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this session has none: use stop_token_ids")
        if request_id is not None and not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        rid = request_id or f"req-{next(self._ids)}"
        return _Request(rid, ids, params, stop_ids, _TextStream(self.tokenizer, params.stop), on_delta)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this session has no tokenizer: give the prompt as token ids")
            from .pipeline import encode_chat

            return encode_chat(self.tokenizer, prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt):
            raise ValueError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("empty prompt: give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return list(prompt)

    def _enqueue(self, reqs: list[_Request]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the session is closed")
            taken = [r.id for r in reqs if r.id in self._live]
            if taken or len({r.id for r in reqs}) != len(reqs):
                raise ValueError(f"request id {taken[:1] or [r.id for r in reqs]} is already in use")
            for r in reqs:
                self._live[r.id] = r
                self._sched.waiting.append(r)
            self._lock.notify()

    def _not_from_loop(self, what: str) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError(f"{what}() inside a session callback would wait on itself: use submit()")

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._has_work():
                    release_openmp_threads()  # idle: another session's loop may be the one computing
                    while not self._has_work():
                        self._lock.wait()
                if self._closed:
                    leaving = list(self._sched.running.values()) + list(self._sched.waiting)
                    self._sched.waiting.clear()
                else:
                    leaving = self._take_cancelled()
                admitted = [] if self._closed else self._sched.admit(lambda r: len(r.prompt))
                self._stats.record_iteration(len(self._sched.waiting))
                closing = self._closed
            for r in leaving:
                self._finish(r, [], "cancelled")
            if closing:
                return
            try:
                if admitted:
                    self._prefill(admitted)
                if self._sched.running:
                    self._step()
            except Exception as e:  # a failed forward must not strand the waiters
                log.exception("decoder failure; failing the running requests")
                for slot, r in list(self._sched.running.items()):
                    self._sched.release(slot)
                    self._finish(r, [], "error", f"{type(e).__name__}: {e}")

    def _has_work(self) -> bool:
        """Under the lock: whether an iteration has anything to do."""
        return bool(self._closed or self._cancels or self._sched.running
                    or (self._sched.waiting and self._sched.free))

    def _take_cancelled(self) -> list[_Request]:
        """Under the lock: remove cancelled requests from the queue and their slots."""
        ids, self._cancels = self._cancels, set()
        if not ids:
            return []
        gone = [r for r in self._sched.waiting if r.id in ids]
        for r in gone:
            self._sched.waiting.remove(r)
        for slot, r in list(self._sched.running.items()):
            if r.id in ids:
                self._sched.release(slot)
                gone.append(r)
        return gone

    def _prefill(self, admitted: list[tuple[int, _Request]]) -> None:
        t0 = time.perf_counter()
        for _, r in admitted:
            r.metrics.queue_s = t0 - r.arrival
        samplers = [None if r.params.greedy else SlotSampler(r.params) for _, r in admitted]
        first = self.decoder.prefill_batch([s for s, _ in admitted], [r.prompt for _, r in admitted], samplers)
        t1 = time.perf_counter()
        with self._lock:
            self._stats.record_prefill(len(admitted), t1 - t0)
        for (slot, r), token in zip(admitted, first):
            r.metrics.ttft_s = t1 - r.arrival
            self._emit(slot, r, [token])

    def _step(self) -> None:
        running = self._sched.running
        slots = sorted(running)
        dec = self.decoder
        if dec.drafter is not None:
            dec.set_config(dec.config.with_shape(*self.beam_policy(len(slots))))
        c = dec.config
        length, drafted = (c.beam_length, c.step_length - 1) if dec.speculative else (1, 0)
        t0 = time.perf_counter()
        out = dec.step(torch.tensor(slots, device=dec.device))
        tokens, counts = out.tokens.tolist(), out.counts.tolist()  # waits for the device
        seconds = time.perf_counter() - t0
        with self._lock:
            if dec.drafter is not None:
                self.beam_policy.observe(len(slots), (c.beam_width, c.beam_length), sum(counts), seconds)
            self._stats.record_step(counts, c.beam_width, length, drafted, seconds)
        for slot, row, n in zip(slots, tokens, counts):
            r = running[slot]
            r.metrics.record_step(n, drafted)
            self._emit(slot, r, row[:n])

    def _emit(self, slot: int, r: _Request, tokens: list[int]) -> None:
        """Append a step's tokens to a request, cutting at its first stop condition."""
        new: list[int] = []
        reason = None
        for token in tokens:
            new.append(token)
            r.token_ids.append(token)
            if token in r.stop_ids or r.text.push(token):
                reason = "stop"
            elif len(r.token_ids) >= r.params.max_new_tokens:
                reason = "length"
            if reason:
                break
        if reason is None:
            self._deliver(r, StreamDelta(r.id, new, r.text.release(final=False)))
            return
        self._sched.release(slot)
        self._finish(r, new, reason)

    def _finish(self, r: _Request, new: list[int], reason: str, error: str | None = None) -> None:
        now = time.perf_counter()
        m = r.metrics
        m.generated_tokens, m.latency_s = len(r.token_ids), now - r.arrival
        text = r.text.release(final=True)
        r.output = RequestOutput(r.id, r.prompt, r.token_ids, r.text.text, reason, m, error)
        with self._lock:
            self._live.pop(r.id, None)
            self._stats.record_finish(reason, m)
        self._deliver(r, StreamDelta(r.id, new, text, True, reason, error))
        r.done.set()

    def _deliver(self, r: _Request, delta: StreamDelta) -> None:
        if r.on_delta is None:
            return
        try:
            r.on_delta(delta)
        except Exception:
            log.exception("on_delta callback of request %s failed; cancelling it", r.id)
            if not delta.finished:
                self.cancel(r.id)


def _is_single_prompt(p: Any) -> bool:
    return isinstance(p, str) or (isinstance(p, (list, tuple)) and bool(p) and all(isinstance(t, int) for t in p))


def policy_for(policy: Policy | str | None, decode: DecodeConfig) -> Policy:
    """The beam policy `policy` names, over shapes up to decode's W x L."""
    width, length = decode.beam_width, decode.beam_length
    if policy is None:
        return BeamPolicy.fixed(width, length)
    if isinstance(policy, (BeamPolicy, MeasuredBeamPolicy)):
        return policy
    if policy == "adaptive":
        shapes = {(1, 1), (1, 2), (1, length), (max(1, width // 2), length), (width, length)}
        return MeasuredBeamPolicy(tuple(sorted(s for s in shapes if s[1] <= length and s[0] * s[1] <= width * length)))
    raise ValueError(f"beam_policy must be None, 'adaptive' or a policy object, got {policy!r}")
