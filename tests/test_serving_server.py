"""The real tritonserver on 127.0.0.1 serving an engine of the tiny random Llama + drafter (the
session-wide `served` fixture of conftest.py): what clients receive equals the offline Session
(greedy), under concurrency too; bad requests fail alone; a client that goes away frees its slot."""
from __future__ import annotations


import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import SERVED_MAX_SEQ_LEN as MAX_SEQ_LEN
from conftest import SERVED_MODEL as MODEL
from conftest import SERVED_SLOTS as SLOTS
from conftest import Served, free_ports, grpc_tensors
from redrafter.runtime.session import SamplingParams

TEXTS = ["What is the capital of France?", "Write a haiku about speculative decoding.",
         "List three prime numbers."]


class Stream:
    """One tritonclient gRPC bidirectional stream; its requests run one after another."""

    def __init__(self, url: str):
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, **inputs: np.ndarray) -> None:
        self.client.async_stream_infer(MODEL, grpc_tensors(inputs))

    def next(self, timeout: float = 120.0):
        result, error = self.responses.get(timeout=timeout)
        return result, error

    def request(self, **inputs: np.ndarray) -> list:
        """Every response of one request, up to the final one; a Triton error raises."""
        self.send(**inputs)
        out = []
        while True:
            result, error = self.next()
            if error is not None:
                raise error
            out.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def tokens(ids: list[int], max_new: int, stream: bool = True, **extra: np.ndarray) -> dict[str, np.ndarray]:
    return dict(input_ids=np.array([ids], np.int32), request_output_len=np.array([[max_new]], np.int32),
                streaming=np.array([[stream]]), **extra)


def joined(responses: list, name: str = "output_ids") -> list[int]:
    return [t for r in responses for t in r.as_numpy(name).reshape(-1).tolist()]


def finish_reason(responses: list) -> str:
    return responses[-1].as_numpy("finish_reason").reshape(-1)[0].decode()


def generate_stream(served: Served, body: dict) -> list[dict]:
    """Triton's HTTP generate_stream endpoint, read event by event (server-sent events)."""
    req = urllib.request.Request(f"{served.server.http_url}/v2/models/{MODEL}/generate_stream",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
    return events


def generate(served: Served, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{served.server.http_url}/v2/models/{MODEL}/generate",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_triton_loaded_the_decoupled_model_with_the_engine_batch_size(served):
    with urllib.request.urlopen(f"{served.server.http_url}/v2/models/{MODEL}/config", timeout=10) as r:
        config = json.loads(r.read())
    assert config["backend"] == "python" and config["model_transaction_policy"]["decoupled"]
    assert config["max_batch_size"] == SLOTS == served.offline.max_batch_size


def test_grpc_token_stream_matches_offline_session(served):
    prompts = [served.offline.tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                            add_generation_prompt=True, return_dict=False)
               for t in TEXTS]
    expected = served.offline.generate([list(p) for p in prompts], SamplingParams(max_new_tokens=12))
    s = Stream(served.server.grpc_url)
    try:
        for prompt, want in zip(prompts, expected):
            responses = s.request(**tokens(list(prompt), 12))
            assert len(responses) > 1  # streamed, not one answer at the end
            assert joined(responses) == want.token_ids
            for r in responses:
                assert r.as_numpy("sequence_length").reshape(-1).tolist() == [r.as_numpy("output_ids").size]
            # every token after the prefill's first comes from a decoder step of >= 1 token
            steps = joined(responses, "accepted_tokens")
            assert sum(steps) == len(want.token_ids) - 1 and min(steps) >= 1
            assert finish_reason(responses) == want.finish_reason
    finally:
        s.close()


def test_grpc_non_streaming_returns_one_response_with_the_prompt_first(served):
    ids = [1, 17, 923, 4051, 77]
    want = served.offline.generate([ids], SamplingParams(max_new_tokens=10))[0].token_ids
    s = Stream(served.server.grpc_url)
    try:
        [whole] = s.request(**tokens(ids, 10, stream=False))
        assert joined([whole]) == ids + want  # TensorRT-LLM's default: output_ids starts with the input
        assert whole.as_numpy("sequence_length").reshape(-1).tolist() == [len(ids) + len(want)]
        [bare] = s.request(**tokens(ids, 10, stream=False, exclude_input_in_output=np.array([[True]])))
        assert joined([bare]) == want
    finally:
        s.close()


def test_seeded_sampling_matches_offline_session(served):
    ids = [1, 300, 301, 302]
    # the server receives FP32 values: give the offline session the same numbers
    params = SamplingParams(max_new_tokens=10, temperature=float(np.float32(0.8)), top_k=50,
                            top_p=float(np.float32(0.9)), seed=7)
    want = served.offline.generate([ids], params)[0].token_ids
    s = Stream(served.server.grpc_url)
    try:
        got = s.request(**tokens(ids, 10, temperature=np.array([[0.8]], np.float32),
                                 runtime_top_k=np.array([[50]], np.int32), runtime_top_p=np.array([[0.9]], np.float32),
                                 random_seed=np.array([[7]], np.uint64)))
        assert joined(got) == want
    finally:
        s.close()


def test_http_generate_and_generate_stream_match_offline_text(served):
    want = served.offline.generate(TEXTS, SamplingParams(max_new_tokens=12))
    for text, out in zip(TEXTS, want):
        events = generate_stream(served, {"text_input": text, "max_tokens": 12, "stream": True})
        assert len(events) > 1 and all("error" not in e for e in events)
        assert "".join(e["text_output"] for e in events) == out.text
        assert events[-1]["finish_reason"] == out.finish_reason
        status, whole = generate(served, {"text_input": text, "max_tokens": 12})
        assert status == 200 and whole["text_output"] == out.text


def test_end_id_and_stop_sequences_end_the_output(served):
    ids = [1, 40, 41, 42, 43, 44]
    full = served.offline.generate([ids], SamplingParams(max_new_tokens=16))[0].token_ids
    k = next(i for i in range(1, len(full) - 1) if full[i] not in full[:i])  # first occurrence at k
    s = Stream(served.server.grpc_url)
    try:
        by_end_id = s.request(**tokens(ids, 16, end_id=np.array([[full[k]]], np.int32)))
        assert joined(by_end_id) == full[:k + 1] and finish_reason(by_end_id) == "stop"
        words = np.array([[[full[k - 1], full[k]], [2, -1]]], np.int32)  # one sequence of two tokens
        by_words = s.request(**tokens(ids, 16, stop_words_list=words))
        assert joined(by_words) == full[:k + 1] and finish_reason(by_words) == "stop"
    finally:
        s.close()
    text = served.offline.generate([TEXTS[0]], SamplingParams(max_new_tokens=16))[0].text
    word = text.split()[2]
    status, cut = generate(served, {"text_input": TEXTS[0], "max_tokens": 16, "stop_words": [word]})
    assert status == 200 and cut["text_output"] == text[:text.index(word)] and cut["finish_reason"] == "stop"


BAD_GRPC = [
    (dict(request_output_len=np.array([[4]], np.int32)), "give exactly one prompt"),
    (dict(input_ids=np.array([[1, 2]], np.int32)), "number of tokens to generate"),
    (dict(input_ids=np.array([[1, 2]], np.int64), request_output_len=np.array([[4]], np.int32)),
     "data-type is 'INT64', but model 'redrafter' expects 'INT32'"),
    (dict(input_ids=np.zeros((1, 0), np.int32), request_output_len=np.array([[4]], np.int32)), "empty prompt"),
    (dict(input_ids=np.array([[1, 2]], np.int32), request_output_len=np.array([[0]], np.int32)),
     "request_output_len=0 must be >= 1"),
    (dict(input_ids=np.array([[1, 2]], np.int32), request_output_len=np.array([[MAX_SEQ_LEN]], np.int32)),
     "exceeds the session's max_seq_len"),
    (dict(input_ids=np.array([[1, 2]], np.int32), request_output_len=np.array([[4]], np.int32),
          temperature=np.array([[-1.0]], np.float32)), "temperature=-1.0"),
    (dict(input_ids=np.array([[1, 49152]], np.int32), request_output_len=np.array([[4]], np.int32)),
     "outside the vocabulary"),
    (dict(input_ids=np.array([[1, 2], [3, 4]], np.int32), request_output_len=np.array([[4], [4]], np.int32)),
     "one sequence per request"),
]
BAD_HTTP = [  # (JSON body, HTTP status, error message)
    ({"text_input": "", "max_tokens": 4}, 400, "empty prompt"),
    ({"text_input": "hi", "max_tokens": -3}, 400, "max_tokens=-3 must be >= 1"),
    ({"text_input": "hi", "max_tokens": 4, "temperature": -0.5}, 400, "temperature=-0.5"),
    ({"text_input": "hi"}, 400, "number of tokens to generate"),
    ({"text_input": "hi", "max_tokens": "four"}, 500, "Unable to parse"),  # Triton itself rejects the type
]


def test_bad_requests_fail_alone_and_the_server_keeps_serving(served):
    good = [1, 5, 9, 13]
    want = served.offline.generate([good], SamplingParams(max_new_tokens=6))[0].token_ids
    s = Stream(served.server.grpc_url)
    try:
        s.send(**tokens(good, 6, stream=False, exclude_input_in_output=np.array([[True]])))  # in flight meanwhile
        for inputs, message in BAD_GRPC:
            s.send(**inputs)
        results = [s.next() for _ in range(len(BAD_GRPC) + 1)]
        answers = [r for r, e in results if e is None]
        errors = sorted(str(e) for r, e in results if e is not None)
        assert len(answers) == 1 and joined(answers) == want  # the good request was not disturbed
        for _, message in BAD_GRPC:
            assert sum(message in e for e in errors) == 1, (message, errors)
    finally:
        s.close()
    for body, code, message in BAD_HTTP:
        status, answer = generate(served, body)
        assert status == code and message in answer["error"], (body, status, answer)
    assert served.server.alive()
    status, answer = generate(served, {"input_ids": good, "request_output_len": 6, "exclude_input_in_output": True})
    assert status == 200 and answer["output_ids"] == want


@pytest.mark.parametrize("client", ["grpc", "http"])
def test_a_client_that_goes_away_frees_its_slot(served, client):
    labels = {"model": MODEL, "instance": f"{MODEL}_0_0"}
    time.sleep(0.6)  # the model publishes its metrics every 0.5 s
    cancelled = served.metric("redrafter_requests_finished", reason="cancelled", **labels)
    generated = served.metric("redrafter_generated_tokens", **labels)
    if client == "grpc":
        s = Stream(served.server.grpc_url)
        s.send(**tokens([1, 2, 3, 4, 5], 400))
        for _ in range(3):
            result, error = s.next()
            assert error is None
        s.close(cancel=True)  # the client hangs up mid-stream
    else:
        conn = http.client.HTTPConnection(served.server.host, served.server.http_port, timeout=60)
        conn.request("POST", f"/v2/models/{MODEL}/generate_stream",
                     body=json.dumps({"text_input": TEXTS[0], "max_tokens": 400, "stream": True}))
        response = conn.getresponse()
        assert response.status == 200 and response.fp.readline()  # the first event has begun
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        running = served.metric("redrafter_requests", state="running", **labels)
        if running == 0 and served.metric("redrafter_requests_finished", reason="cancelled", **labels) > cancelled:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the abandoned request still holds its slot after 15 s")
    time.sleep(0.6)
    assert served.metric("redrafter_generated_tokens", **labels) - generated < 400  # it stopped early
    s = Stream(served.server.grpc_url)  # and the server still answers
    try:
        assert len(joined(s.request(**tokens([1, 2, 3], 4, stream=False)))) == 3 + 4
    finally:
        s.close()


def test_load_200_requests_over_32_streams(served):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 49152, size=int(rng.integers(3, 40))).tolist() for _ in range(200)]
    max_new = 8
    want = [o.token_ids for o in served.offline.generate(prompts, SamplingParams(max_new_tokens=max_new))]
    got: dict[int, list[int]] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        s = Stream(served.server.grpc_url)
        try:
            for i in range(w, len(prompts), 32):
                stream = i % 2 == 0  # half streamed, half in one response
                responses = s.request(**tokens(prompts[i], max_new, stream=stream,
                                               exclude_input_in_output=np.array([[True]])))
                with lock:
                    got[i] = joined(responses)
        except Exception as e:
            with lock:
                failures.append(f"stream {w}: {type(e).__name__}: {e}")
        finally:
            s.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "some streams did not finish within 240 s"
    assert failures == []
    assert sorted(got) == list(range(200))  # none lost
    assert [i for i in range(200) if got[i] != want[i]] == []
    assert served.server.alive()
    with urllib.request.urlopen(f"{served.server.http_url}/v2/health/ready", timeout=10) as r:
        assert r.status == 200


def processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every process we can see."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        found[int(pid)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return found


def test_serve_cli_serves_until_sigterm_and_leaves_no_process(served, tmp_path):
    http_port, grpc_port, metrics_port = free_ports(3)
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        cli = subprocess.Popen([sys.executable, "-m", "redrafter.cli", "serve", "--repository",
                                str(served.repository), "--http-port", str(http_port), "--grpc-port",
                                str(grpc_port), "--metrics-port", str(metrics_port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "ready:" not in log.read_text():
            assert cli.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        procs = processes()
        [server] = [pid for pid, (_, cmd) in procs.items()
                    if cmd.split(b"\0")[0].endswith(b"tritonserver") and f"\0{metrics_port}\0".encode() in cmd]
        stubs = [pid for pid, (parent, _) in procs.items() if parent == server]
        assert stubs  # the model instance runs in a stub process
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v2/models/{MODEL}/generate",
                                     data=json.dumps({"input_ids": [1, 2, 3], "request_output_len": 3}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            assert len(json.loads(r.read())["output_ids"]) == 6
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=60) == 0
    finally:
        if cli.poll() is None:  # a failed check: let the CLI stop its server, kill it only if it hangs
            cli.terminate()
            try:
                cli.wait(timeout=60)
            except subprocess.TimeoutExpired:
                cli.kill()
    assert set(processes()) & {server, *stubs} == set()
