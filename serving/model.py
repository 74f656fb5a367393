"""The Triton Python backend model: one runtime Session per model instance.

execute() only validates each request and submits it to the Session, whose loop thread
batches every running request in flight; the Session hands each request's deltas to a
queue, and one responder thread turns them into responses on the request's decoupled
response sender (sending over the backend's IPC never holds up the decoder). The same
thread notices clients that went away (a cancelled request or a failed send) and cancels
their Session request, which frees the slot at the next step, and publishes the Session's
metrics on Triton's metrics endpoint.

Runs inside the backend stub process, where `triton_python_backend_utils` is importable.
"""
from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .protocol import ParsedRequest, StopMatcher, parse_request
from .repository import ModelSource

POLL_S = 0.1  # how often the responder looks for cancelled requests
METRICS_S = 0.5  # how often it publishes the Session's metrics


@dataclass
class _Stream:
    """One request in flight."""

    request: Any
    sender: Any
    parsed: ParsedRequest
    stops: StopMatcher
    rid: str
    prefilled: bool = False  # the first token (from prefill, not a decoder step) has arrived
    token_ids: list[int] = field(default_factory=list)  # pending for the next response
    text: list[str] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)  # tokens each decoder step emitted
    closed: bool = False


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb

        self.pb = pb
        config = json.loads(args["model_config"])
        if not pb.using_decoupled_model_transaction_policy(config):
            raise ValueError("the redrafter model streams: its config.pbtxt needs "
                             "model_transaction_policy { decoupled: true }")
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.source = ModelSource.from_parameters(params)
        self.session = self.source.open_session()
        self.log = pb.Logger
        self.log.log_info(f"redrafter: {args['model_instance_name']} serves {self.source} with "
                          f"{self.session.max_batch_size} slots")
        self._ids = itertools.count()
        self._streams: dict[str, _Stream] = {}  # by Session request id; touched by the responder only
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._metrics = _Metrics(pb, {"model": args["model_name"], "version": args["model_version"],
                                      "instance": args["model_instance_name"]})
        self._stop = threading.Event()
        self._unloading = False
        self._responder = threading.Thread(target=self._respond, name="redrafter-responder", daemon=True)
        self._responder.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._admit(request)
        return None  # decoupled: responses go through each request's sender

    def finalize(self) -> None:
        self._unloading = True
        self.session.close()  # everything still running ends "cancelled" and gets an error
        self._stop.set()
        self._responder.join(timeout=30)

    # ------------------------------------------------------------------ requests

    def _admit(self, request: Any) -> None:
        pb = self.pb
        sender = request.get_response_sender()

        def get(name: str) -> np.ndarray | None:
            t = pb.get_input_tensor_by_name(request, name)
            return None if t is None else t.as_numpy()

        try:
            parsed = parse_request(get, self.session.vocab_size, self.session.max_seq_len)
        except ValueError as e:
            _send_error(pb, sender, str(e), invalid=True)
            return
        except Exception as e:  # a bug: answer this request, keep serving
            self.log.log_error(f"redrafter: parsing a request failed: {type(e).__name__}: {e}")
            _send_error(pb, sender, f"internal error: {type(e).__name__}: {e}")
            return
        stream = _Stream(request, sender, parsed, StopMatcher(parsed.stop_sequences), f"triton-{next(self._ids)}")
        self._outbox.put((stream, None))  # registers it with the responder before any of its deltas
        try:
            self.session.submit(parsed.prompt, parsed.params, lambda d: self._outbox.put((stream, d)),
                                request_id=stream.rid)
        except ValueError as e:
            self._outbox.put((stream, _Rejected(str(e), invalid=True)))
        except Exception as e:  # a bug or a closed session: answer rather than leave the client waiting
            self.log.log_error(f"redrafter: submit failed: {type(e).__name__}: {e}")
            self._outbox.put((stream, _Rejected(f"internal error: {type(e).__name__}: {e}")))

    def _respond(self) -> None:
        next_poll = next_metrics = 0.0
        while not (self._stop.is_set() and self._outbox.empty()):
            try:
                stream, delta = self._outbox.get(timeout=POLL_S)
            except queue.Empty:
                stream = None
            if stream is not None:
                try:
                    self._handle(stream, delta)
                except Exception as e:  # a bug: fail this request, keep serving the others
                    self.log.log_error(f"redrafter: responding to {stream.rid}: {type(e).__name__}: {e}")
                    if not stream.closed:
                        self._close(stream)
                        self.session.cancel(stream.rid)
                        _send_error(self.pb, stream.sender, f"internal error: {type(e).__name__}: {e}")
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + POLL_S
                self._cancel_abandoned()
            if now >= next_metrics:
                next_metrics = now + METRICS_S
                self._metrics.publish(self.session.metrics())

    def _handle(self, s: _Stream, delta: Any) -> None:
        if delta is None:
            self._streams[s.rid] = s
            return
        if s.closed:
            return
        if isinstance(delta, _Rejected):
            self._close(s)
            _send_error(self.pb, s.sender, delta.message, invalid=delta.invalid)
            return
        if delta.finish_reason == "error" or (self._unloading and delta.finish_reason == "cancelled"):
            self._close(s)
            _send_error(self.pb, s.sender, f"generation failed: {delta.error}" if delta.error
                        else "the model is being unloaded: retry the request")
            return
        tokens, finished, reason = delta.token_ids, delta.finished, delta.finish_reason
        if tokens:
            keep = s.stops.feed(tokens)
            if keep is not None:
                tokens, finished, reason = tokens[:keep], True, "stop"
                if not delta.finished:
                    self.session.cancel(s.rid)  # its "cancelled" delta then finds the stream closed
            if s.prefilled:  # every later delta with tokens is one decoder step
                s.step_tokens.append(len(tokens))
            s.prefilled = True
        s.token_ids += tokens
        s.text.append(delta.text)
        if finished:
            self._close(s)
            self._send(s, reason, final=True)
        elif s.parsed.stream and (s.token_ids if not s.parsed.text else any(s.text)):
            self._send(s, None, final=False)

    def _send(self, s: _Stream, reason: str | None, final: bool) -> None:
        pb = self.pb
        if s.parsed.text:
            outputs = [pb.Tensor("text_output", _strings(["".join(s.text)]).reshape(1, 1))]
        else:
            ids = (s.parsed.prompt if s.parsed.echo_prompt else []) + s.token_ids
            outputs = [pb.Tensor("output_ids", np.array(ids, dtype=np.int32).reshape(1, 1, -1)),
                       pb.Tensor("sequence_length", np.array([[len(ids)]], dtype=np.int32)),
                       pb.Tensor("accepted_tokens", np.array(s.step_tokens, dtype=np.int32).reshape(1, -1))]
        if reason is not None:
            outputs.append(pb.Tensor("finish_reason", _strings([reason]).reshape(1, 1)))
        s.token_ids, s.text, s.step_tokens = [], [], []
        flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            if reason == "cancelled":  # nobody is listening: just release the request
                s.sender.send(flags=flags)
            else:
                s.sender.send(pb.InferenceResponse(output_tensors=outputs), flags=flags)
        except Exception:  # the client is gone: stop generating for it
            if not final:
                self._close(s)
                self.session.cancel(s.rid)
                try:
                    s.sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception:
                    pass

    def _close(self, s: _Stream) -> None:
        s.closed = True
        self._streams.pop(s.rid, None)

    def _cancel_abandoned(self) -> None:
        for s in list(self._streams.values()):
            if _cancelled(s):
                self.session.cancel(s.rid)


@dataclass(frozen=True)
class _Rejected:
    message: str
    invalid: bool = False  # the request's fault (INVALID_ARG), else the server's (INTERNAL)


def _cancelled(s: _Stream) -> bool:
    check = getattr(s.sender, "is_cancelled", None) or s.request.is_cancelled
    try:
        return bool(check())
    except Exception:
        return True


def _send_error(pb: Any, sender: Any, message: str, invalid: bool = False) -> None:
    """A request's final response, an error: INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT) when
    the request is at fault, so clients know not to retry it as it is; else INTERNAL."""
    code = pb.TritonError.INVALID_ARG if invalid else pb.TritonError.INTERNAL
    try:
        sender.send(pb.InferenceResponse(error=pb.TritonError(message, code)),
                    flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception:
        pass


def _strings(values: list[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


class _Metrics:
    """The Session's metrics as Prometheus series on Triton's metrics endpoint."""

    def __init__(self, pb: Any, labels: dict[str, str]):
        fam = pb.MetricFamily
        self.labels = labels
        requests = fam("redrafter_requests", "Requests in the session: running (holding a slot) or waiting", fam.GAUGE)
        finished = fam("redrafter_requests_finished", "Requests finished, by reason", fam.COUNTER)
        tokens = fam("redrafter_generated_tokens", "Tokens generated", fam.COUNTER)
        steps = fam("redrafter_decoder_steps", "Decoder steps run", fam.COUNTER)
        per_step = fam("redrafter_tokens_per_step", "Mean tokens a sequence gains per decoder step", fam.GAUGE)
        self.running = requests.Metric(labels | {"state": "running"})
        self.waiting = requests.Metric(labels | {"state": "waiting"})
        self.finished = {r: finished.Metric(labels | {"reason": r}) for r in ("stop", "length", "cancelled", "error")}
        self.tokens, self.steps, self.per_step = tokens.Metric(labels), steps.Metric(labels), per_step.Metric(labels)
        self._families = (requests, finished, tokens, steps, per_step)  # keep them registered
        self._last: dict[str, float] = {}

    def publish(self, m: dict[str, Any]) -> None:
        req = m["requests"]
        self.running.set(req["running"])
        self.waiting.set(req["waiting"])
        for reason, metric in self.finished.items():
            self._add(f"finished:{reason}", metric, req.get(reason, 0))
        self._add("tokens", self.tokens, m["generated_tokens"])
        self._add("steps", self.steps, m["steps"])
        self.per_step.set(m["tokens_per_step"])

    def _add(self, key: str, counter: Any, total: float) -> None:
        delta = total - self._last.get(key, 0)
        if delta > 0:
            counter.increment(delta)
            self._last[key] = total
