"""The tensors the redrafter Triton model takes and returns, and how a request maps to a
Session call.

One model serves two interfaces through one Session, so token-level and text-level
requests share the in-flight batch:

- token level, with the names, types and shapes of TensorRT-LLM's Triton model so its
  clients work unchanged: input_ids (+ input_lengths, request_output_len, end_id, pad_id,
  streaming, temperature, runtime_top_k, runtime_top_p, random_seed, stop_words_list,
  exclude_input_in_output) -> output_ids [1, beams=1, n], sequence_length, accepted_tokens;
- text level, with the names of TensorRT-LLM's "ensemble" model, which Triton's HTTP
  generate / generate_stream endpoints fill from JSON: text_input (+ max_tokens, stream,
  temperature, top_k, top_p, random_seed, stop_words) -> text_output.

accepted_tokens lists, for each decoder step a response covers, the tokens that step added
(accepted drafts + the bonus token, so plain decoding gives 1s; the first token, from
prefill, is no step). The last response of a request carries finish_reason ("stop" | "length").
Triton checks names, data types and fixed dimensions against config.pbtxt; `parse_request`
checks the rest and raises ValueError naming the input and the fix, which the model returns as
that request's error with code INVALID_ARG: HTTP 400; over gRPC (always a stream, the model
being decoupled) a stream error carrying the message, whose INVALID_ARGUMENT status Triton sends
only in its triton_grpc_error stream mode.

Limits. A request is refused before it costs memory or time out of proportion to what it may
ask for: Triton accepts any payload it can parse (this tritonserver has no size option for
either protocol), so the model checks sizes before it decodes or copies anything:
- prompt: at most max_seq_len - 1 tokens (the engine's max_seq_len; one token left to generate),
  and input_ids may carry at most max_seq_len ids (padding included); text_input at most
  MAX_TEXT_BYTES bytes of UTF-8 (then its tokens count against max_seq_len, in the Session);
- prompt + max_tokens: at most max_seq_len (the Session's check);
- stop words: at most MAX_STOP_WORDS per request, each at most MAX_STOP_WORD_BYTES bytes (text)
  or MAX_STOP_WORD_TOKENS tokens (stop_words_list);
- temperature: 0 (greedy) or a finite number >= MIN_TEMPERATURE (smaller ones overflow the
  scaled logits to inf); top_p in (0, 1]; top_k >= 0; random_seed < 2**63; token ids
  (input_ids, end_id, stop_words_list) inside the vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from redrafter.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton config type
    dims: tuple[int, ...]  # without the batch dimension (every request carries batch 1)


# Every input is optional for Triton: which ones a request needs depends on its interface.
INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("input_ids", "TYPE_INT32", (-1,)),
    TensorSpec("input_lengths", "TYPE_INT32", (1,)),
    TensorSpec("request_output_len", "TYPE_INT32", (1,)),
    TensorSpec("end_id", "TYPE_INT32", (1,)),
    TensorSpec("pad_id", "TYPE_INT32", (1,)),
    TensorSpec("streaming", "TYPE_BOOL", (1,)),
    TensorSpec("runtime_top_k", "TYPE_INT32", (1,)),
    TensorSpec("runtime_top_p", "TYPE_FP32", (1,)),
    TensorSpec("stop_words_list", "TYPE_INT32", (2, -1)),
    TensorSpec("exclude_input_in_output", "TYPE_BOOL", (1,)),
    TensorSpec("text_input", "TYPE_STRING", (1,)),
    TensorSpec("max_tokens", "TYPE_INT32", (1,)),
    TensorSpec("stream", "TYPE_BOOL", (1,)),
    TensorSpec("top_k", "TYPE_INT32", (1,)),
    TensorSpec("top_p", "TYPE_FP32", (1,)),
    TensorSpec("stop_words", "TYPE_STRING", (-1,)),
    TensorSpec("temperature", "TYPE_FP32", (1,)),
    TensorSpec("random_seed", "TYPE_UINT64", (1,)),
)
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("output_ids", "TYPE_INT32", (-1, -1)),
    TensorSpec("sequence_length", "TYPE_INT32", (-1,)),
    TensorSpec("accepted_tokens", "TYPE_INT32", (-1,)),
    TensorSpec("text_output", "TYPE_STRING", (-1,)),
    TensorSpec("finish_reason", "TYPE_STRING", (1,)),
)
INPUT_NAMES = frozenset(s.name for s in INPUTS)
# (token-level name, text-level name) pairs that mean the same thing.
ALIASES = (("request_output_len", "max_tokens"), ("streaming", "stream"),
           ("runtime_top_k", "top_k"), ("runtime_top_p", "top_p"))
TOKEN_ONLY = ("input_lengths", "end_id", "pad_id", "stop_words_list", "exclude_input_in_output")
TEXT_ONLY = ("stop_words",)
SEED_LIMIT = 2**63  # SamplingParams.seed range
MAX_TEXT_BYTES = 256 * 1024  # text_input; a prompt that long is already far beyond any max_seq_len in use
MAX_STOP_WORDS = 16  # stop strings or stop sequences per request: each is matched at every step
MAX_STOP_WORD_BYTES = 256
MAX_STOP_WORD_TOKENS = 64
MIN_TEMPERATURE = 1e-6  # logits / temperature must stay finite in float32


@dataclass(frozen=True)
class ParsedRequest:
    prompt: str | list[int]  # text gets the chat template in the Session; ids go in as they are
    params: SamplingParams
    stream: bool
    text: bool  # text interface: answer with text_output, else output_ids
    echo_prompt: bool  # token interface, non-streaming: output_ids starts with the prompt (TRT-LLM default)
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token interface: generation ends after any of these


def parse_request(get: Callable[[str], np.ndarray | None], vocab_size: int, max_seq_len: int) -> ParsedRequest:
    """Validate one request's tensors against the limits above; `get(name)` returns the input
    as an array of shape [1, *dims] (batch first) or None when the request does not carry it."""
    arrays = {name: get(name) for name in sorted(INPUT_NAMES)}
    arrays = {k: v for k, v in arrays.items() if v is not None}
    for name, a in arrays.items():
        if a.ndim == 0 or a.shape[0] != 1:
            raise ValueError(f"input {name!r} has shape {list(a.shape)}: send one sequence per request "
                             "(batch dimension 1); concurrent requests are batched in flight by the server")
    for token_name, text_name in ALIASES:
        if token_name in arrays and text_name in arrays:
            raise ValueError(f"inputs {token_name!r} and {text_name!r} mean the same thing: give only one")

    if ("input_ids" in arrays) == ("text_input" in arrays):
        raise ValueError("give exactly one prompt: 'input_ids' (token ids, INT32) or 'text_input' (text)")
    text = "text_input" in arrays
    for name in TOKEN_ONLY if text else TEXT_ONLY:
        if name in arrays:
            other = "input_ids" if text else "text_input"
            raise ValueError(f"input {name!r} applies to requests with {other!r} only")

    def scalar(*names: str):
        for name in names:
            if name in arrays:
                a = arrays[name]
                if a.size != 1:
                    raise ValueError(f"input {name!r} must hold one value, got shape {list(a.shape)}")
                return name, a.reshape(-1)[0].item()
        return names[-1], None

    prompt: str | list[int]
    if text:
        raw = arrays["text_input"]
        if raw.size != 1:
            raise ValueError(f"input 'text_input' must hold one string, got shape {list(raw.shape)}")
        prompt = _text(raw.reshape(-1)[0], "text_input", MAX_TEXT_BYTES)
        if not prompt.strip():
            raise ValueError("empty prompt: 'text_input' must contain some text")
    else:
        ids = arrays["input_ids"].reshape(-1)
        if ids.size > max_seq_len:
            raise ValueError(f"input_ids holds {ids.size} token ids, more than the engine's max_seq_len "
                             f"{max_seq_len}: shorten the prompt (at most {max_seq_len - 1} tokens, leaving room "
                             "to generate)")
        _, length = scalar("input_lengths")
        if length is not None:
            if not 1 <= length <= ids.size:
                raise ValueError(f"input_lengths={length} must be in [1, {ids.size}] (the input_ids given)")
            ids = ids[:length]
        if ids.size == 0:
            raise ValueError("empty prompt: 'input_ids' must hold at least one token id")
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise ValueError(f"input_ids holds token id {int(bad[0])}, outside the vocabulary [0, {vocab_size})")
        prompt = ids.astype(np.int64).tolist()

    name, max_new = scalar("request_output_len", "max_tokens")
    if max_new is None:
        raise ValueError("give the number of tokens to generate: 'max_tokens' (or 'request_output_len')")
    if max_new < 1:
        raise ValueError(f"{name}={max_new} must be >= 1")
    name, temperature = scalar("temperature")
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0 = greedy)")
    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature={temperature} is below {MIN_TEMPERATURE}: use 0 for greedy decoding")
    name, top_k = scalar("runtime_top_k", "top_k")
    if top_k is not None and top_k < 0:
        raise ValueError(f"{name}={top_k} must be >= 0 (0 = no top-k filter)")
    name, top_p = scalar("runtime_top_p", "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"{name}={top_p} must be in (0, 1] (1 = no nucleus filter)")
    _, seed = scalar("random_seed")
    if seed is not None and seed >= SEED_LIMIT:
        raise ValueError(f"random_seed={seed} must be < 2**63")
    _, stream = scalar("streaming", "stream")
    _, end_id = scalar("end_id")
    if end_id is not None and not 0 <= end_id < vocab_size:
        raise ValueError(f"end_id={end_id} is outside the vocabulary [0, {vocab_size})")
    _, pad_id = scalar("pad_id")  # output_ids holds one unpadded sequence: pad_id is only checked
    if pad_id is not None and pad_id < 0:
        raise ValueError(f"pad_id={pad_id} must be >= 0")
    _, exclude_input = scalar("exclude_input_in_output")

    stop: tuple[str, ...] = ()
    if "stop_words" in arrays:
        raw_words = arrays["stop_words"].reshape(-1)
        if raw_words.size > MAX_STOP_WORDS:
            raise ValueError(f"stop_words holds {raw_words.size} strings, more than the limit of {MAX_STOP_WORDS}")
        words = [_text(w, "stop_words", MAX_STOP_WORD_BYTES) for w in raw_words]
        stop = tuple(w for w in words if w)  # TRT-LLM clients send "" for "no stop words"
    stop_sequences = _stop_words_list(arrays["stop_words_list"], vocab_size) if "stop_words_list" in arrays else ()

    params = dict(max_new_tokens=int(max_new), stop=stop)
    if temperature is not None:
        params["temperature"] = float(temperature)
    if top_k is not None:
        params["top_k"] = int(top_k)
    if top_p is not None:
        params["top_p"] = float(top_p)
    if seed is not None:
        params["seed"] = int(seed)
    if end_id is not None:  # TRT-LLM semantics: end_id is the one end token
        params |= dict(stop_token_ids=(int(end_id),), ignore_eos=True)
    return ParsedRequest(prompt, SamplingParams(**params), bool(stream), text,
                         echo_prompt=not text and not stream and not exclude_input,
                         stop_sequences=stop_sequences)


def _text(value: bytes | str, name: str, max_bytes: int) -> str:
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
    if len(raw) > max_bytes:
        raise ValueError(f"input {name!r} holds {len(raw)} bytes, more than the limit of {max_bytes}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"input {name!r} is not valid UTF-8 (byte {e.start}): send UTF-8 text") from None


def _stop_words_list(a: np.ndarray, vocab_size: int) -> tuple[tuple[int, ...], ...]:
    """TensorRT-LLM's layout [1, 2, n]: row 0 the concatenated token ids of all stop
    sequences, row 1 their cumulative end offsets, padded with -1."""
    if a.ndim != 3 or a.shape[1] != 2:
        raise ValueError(f"stop_words_list has shape {list(a.shape)}, expected [1, 2, n] "
                         "(row 0 token ids, row 1 cumulative end offsets padded with -1)")
    if a.shape[2] > MAX_STOP_WORDS * MAX_STOP_WORD_TOKENS:
        raise ValueError(f"stop_words_list holds {a.shape[2]} ids, more than the limit of "
                         f"{MAX_STOP_WORDS} sequences of {MAX_STOP_WORD_TOKENS} tokens")
    tokens, offsets = a[0, 0].tolist(), a[0, 1].tolist()
    ends = [o for o in offsets if o >= 0]
    if offsets[: len(ends)] != ends:
        raise ValueError("stop_words_list offsets must come first, followed only by -1 padding")
    if len(ends) > MAX_STOP_WORDS:
        raise ValueError(f"stop_words_list holds {len(ends)} sequences, more than the limit of {MAX_STOP_WORDS}")
    sequences, start = [], 0
    for end in ends:
        if not start < end <= len(tokens):
            raise ValueError(f"stop_words_list offsets {ends} must increase and stay within the {len(tokens)} ids")
        seq = tuple(tokens[start:end])
        if len(seq) > MAX_STOP_WORD_TOKENS:
            raise ValueError(f"stop_words_list holds a sequence of {len(seq)} tokens, more than the limit of "
                             f"{MAX_STOP_WORD_TOKENS}")
        if any(not 0 <= t < vocab_size for t in seq):
            raise ValueError(f"stop_words_list holds a token id outside the vocabulary [0, {vocab_size})")
        sequences.append(seq)
        start = end
    return tuple(sequences)


class StopMatcher:
    """Ends a token stream after the first completed stop sequence (kept in the output,
    as TensorRT-LLM keeps stop words)."""

    def __init__(self, sequences: tuple[tuple[int, ...], ...]):
        self.sequences = [list(s) for s in sequences]
        self.tail: list[int] = []  # the last max_len - 1 tokens seen, for matches across deltas
        self.keep = max((len(s) for s in self.sequences), default=1) - 1

    def feed(self, tokens: list[int]) -> int | None:
        """The number of `tokens` to keep if a stop sequence ends among them, else None."""
        if not self.sequences:
            return None
        window = list(self.tail)
        for i, tok in enumerate(tokens):
            window.append(tok)
            if any(window[-len(s):] == s for s in self.sequences):
                return i + 1
        self.tail = window[-self.keep:] if self.keep else []
        return None
