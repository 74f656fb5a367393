"""Reliability through the real tritonserver: hostile input, exposure, faults and load.

Hostile input goes to the session-wide `served` server (conftest.py); the faults that break a
server run their own `redrafter serve`, `redrafter build` and `redrafter train` processes.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import SERVED_MAX_SEQ_LEN as MAX_SEQ_LEN
from conftest import SERVED_MODEL as MODEL
from conftest import free_ports, grpc_tensors
from redrafter.runtime.config import DecodeConfig
from redrafter.runtime.session import SamplingParams
from redrafter.serving.protocol import MAX_STOP_WORD_BYTES, MAX_STOP_WORDS, MAX_TEXT_BYTES
from redrafter.serving.server import exposed, stub_processes

VOCAB = 49152  # the tiny engine's (SmolLM2's tokenizer)


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def server_pids(served) -> list[int]:
    return [served.server.proc.pid, *stub_processes(served.server.proc.pid)]


# --- hostile input -------------------------------------------------------------------------------

def _i32(*v) -> np.ndarray:
    return np.array([list(v)], np.int32)


def hostile_grpc(rng: np.random.Generator) -> list[tuple[dict[str, np.ndarray], str]]:
    """(inputs, what the error must say) for malformed token- and text-level requests."""
    ids = lambda n: rng.integers(3, VOCAB, size=n).astype(np.int32)[None]  # noqa: E731
    ok = dict(input_ids=ids(4), request_output_len=_i32(4))
    text = lambda b: np.array([[b]], object)  # noqa: E731
    cases = [
        (dict(ok, request_output_len=_i32(int(rng.integers(-2**31, 1)))), "must be >= 1"),
        (dict(ok, request_output_len=_i32(int(rng.integers(MAX_SEQ_LEN, 2**31)))), "exceeds the session's max_seq_len"),
        (dict(ok, input_ids=ids(int(rng.integers(MAX_SEQ_LEN - 3, MAX_SEQ_LEN + 1)))), "exceeds the session's max_seq_len"),
        (dict(ok, input_ids=ids(int(rng.integers(MAX_SEQ_LEN + 1, 20 * MAX_SEQ_LEN)))), "more than the engine's max_seq_len"),
        (dict(ok, input_ids=_i32(1, int(rng.choice([-1, -2**31, VOCAB, 2**31 - 1])))), "outside the vocabulary"),
        (dict(ok, input_ids=ids(3).astype(rng.choice([np.int64, np.float32, np.int16]))), "data-type is"),
        (dict(ok, request_output_len=np.array([[4]], np.int64)), "data-type is"),
        (dict(ok, request_output_len=_i32(4, 4)), "unexpected shape"),
        (dict(ok, input_ids=np.ones((2, 3), np.int32)), "batch size does not match"),
        (dict(ok, temperature=np.array([[rng.choice([np.nan, np.inf, -np.inf, -1.0, 1e-30])]], np.float32)),
         "temperature="),
        (dict(ok, runtime_top_p=np.array([[rng.choice([np.nan, 0.0, -1.0, 1.5, np.inf])]], np.float32)), "top_p="),
        (dict(ok, runtime_top_k=_i32(int(rng.integers(-2**31, 0)))), "runtime_top_k="),
        (dict(ok, random_seed=np.array([[int(rng.integers(2**63, 2**64, dtype=np.uint64))]], np.uint64)), "random_seed"),
        (dict(ok, end_id=_i32(int(rng.choice([-5, VOCAB])))), "end_id="),
        (dict(ok, stop_words_list=np.array([[[1] * 3, [5, -1, -1]]], np.int32)), "must increase and stay within"),
        (dict(ok, stop_words_list=np.ones((1, 2, 17 * 64), np.int32)), "more than the limit"),
        (dict(ok, stop_words_list=np.array([[list(range(1, 18)), list(range(1, 18))]], np.int32)), "17 sequences"),
        (dict(request_output_len=_i32(4)), "give exactly one prompt"),
        (dict(ok, text_input=text(b"hi")), "give exactly one prompt"),
        (dict(text_input=text(b"hi"), max_tokens=_i32(4), stop_words=np.array(
            [[b"a"] * int(rng.integers(MAX_STOP_WORDS + 1, 5000))], object)), "stop_words holds"),
        (dict(text_input=text(b"hi"), max_tokens=_i32(4), stop_words=np.array(
            [[b"x" * (MAX_STOP_WORD_BYTES + 1)]], object)), "more than the limit"),
        (dict(text_input=text(b"ok \xff" + bytes(rng.integers(128, 256, size=5).astype(np.uint8))),
              max_tokens=_i32(4)), "not valid UTF-8"),
        (dict(text_input=text(b"a " * (MAX_TEXT_BYTES // 2 + 1)), max_tokens=_i32(4)), "more than the limit"),
        (dict(text_input=text(b"   "), max_tokens=_i32(4)), "empty prompt"),
        (dict(text_input=text(b"hi"), max_tokens=_i32(4), end_id=_i32(1)), "applies to requests with 'input_ids'"),
    ]
    return cases


def hostile_http(rng: np.random.Generator) -> list[tuple[bytes, int, str]]:
    """(generate body, HTTP status, what the error must say). Refusals by the model are 400;
    a body Triton itself cannot parse (bad JSON, a value of the wrong JSON type) Triton answers
    500 "Unable to parse" / "failed to parse" before the model sees it."""
    body = lambda **kw: json.dumps(kw).encode()  # noqa: E731
    cases = [
        (body(text_input="hi", max_tokens=int(rng.integers(-2**31, 1))), 400, "must be >= 1"),
        (body(text_input="hi", max_tokens=int(rng.integers(MAX_SEQ_LEN, 2**31))), 400, "exceeds the session's max_seq_len"),
        (body(text_input="hi", max_tokens=4, temperature=float(rng.choice([-1.0, 1e-30, 1e39]))), 400, "temperature="),
        (body(text_input="hi", max_tokens=4, top_p=float(rng.choice([0.0, 2.0, -0.5]))), 400, "top_p="),
        (b'{"text_input": "hi", "max_tokens": 4, "temperature": NaN}', 400, "temperature=nan"),
        (body(text_input="hi", max_tokens=4, top_k=-int(rng.integers(1, 2**31))), 400, "top_k="),
        (body(text_input="hi", max_tokens=4, stop_words=["s"] * int(rng.integers(MAX_STOP_WORDS + 1, 3000))), 400,
         "stop_words holds"),
        (body(text_input="x" * int(rng.integers(MAX_TEXT_BYTES + 1, 4 * MAX_TEXT_BYTES)), max_tokens=4), 400,
         "more than the limit"),
        (body(text_input="word " * (MAX_TEXT_BYTES // 5), max_tokens=4), 400, "exceeds the session's max_seq_len"),
        (b'{"text_input": "ok \xc3\x28 ' + bytes(rng.integers(0xf8, 0x100, size=3).astype(np.uint8)) +
         b'", "max_tokens": 4}', 400, "not valid UTF-8"),
        (body(input_ids=[1, int(rng.choice([-1, VOCAB, 10**11]))], request_output_len=4), 400, "outside the vocabulary"),
        (body(input_ids=rng.integers(3, VOCAB, size=int(rng.integers(MAX_SEQ_LEN + 1, 5000))).tolist(),
              request_output_len=4), 400, "more than the engine's max_seq_len"),
        (body(text_input=["a", "b"], max_tokens=4), 400, "batch size does not match"),
        (body(text_input="", max_tokens=4), 400, "empty prompt"),
        (body(text_input="hi", max_tokens=4, random_seed=2**63), 400, "random_seed"),
        (body(text_input="hi", max_tokens=str(rng.integers(1, 9))), 500, "Unable to parse"),
        (body(text_input="hi", max_tokens=4.5), 500, "Unable to parse"),
        (body(text_input="hi", max_tokens=4, stream="yes"), 500, "Unable to parse"),
        (body(text_input="hi", max_tokens=4, stop_words=[1, 2]), 500, "Unable to parse"),
        (b'{"text_input": "hi", "max_tokens": 4' + bytes(rng.integers(0, 128, size=2).astype(np.uint8)), 500,
         "failed to parse the request JSON"),
        (b'{"text_input": "\\ud800", "max_tokens": 4}', 500, "failed to parse the request JSON"),
    ]
    return cases


class ErrorStream:
    """A gRPC stream (no triton_grpc_error header: see the test) whose every request must fail."""

    def __init__(self, url: str):
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def error(self, inputs: dict[str, np.ndarray]) -> str:
        self.client.async_stream_infer(MODEL, grpc_tensors(inputs))
        result, error = self.responses.get(timeout=60)
        assert error is not None, f"accepted: {sorted(inputs)}"
        return str(error)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def post(url: str, body: bytes, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_hostile_requests_are_refused_by_name_and_the_server_stays_up_with_flat_memory(served):
    """A few hundred generated malformed requests over gRPC and HTTP: each refused with an
    error naming the problem (HTTP 400 when the model refuses it), none kills or leaks in the
    server. gRPC refusals come back as stream errors carrying the message: their INVALID_ARGUMENT
    status travels only in Triton's triton_grpc_error stream mode, which crashes this tritonserver
    build (SIGSEGV, seen with nvidia-pytriton 0.7.0), so clients must not use it."""
    rng = np.random.default_rng(30)
    url = f"{served.server.http_url}/v2/models/{MODEL}/generate"
    stream = ErrorStream(served.server.grpc_url)
    failures: list[str] = []

    def one_round() -> int:
        n = 0
        for inputs, message in hostile_grpc(rng):
            error = stream.error(inputs)
            n += 1
            if message not in error:
                failures.append(f"gRPC {sorted(inputs)}: {message!r} not in {error[:300]!r}")
        for body, status, message in hostile_http(rng):
            got, answer = post(url, body)
            n += 1
            if got != status or message not in answer.get("error", ""):
                failures.append(f"HTTP {body[:80]!r}: expected {status} {message!r}, got {got} {str(answer)[:300]}")
        return n

    try:
        one_round()  # warm-up: the first of each error path allocates what it keeps (buffers, arenas)
        before = rss_bytes(server_pids(served))
        sent = sum(one_round() for _ in range(6))
        after = rss_bytes(server_pids(served))
    finally:
        stream.close()
    assert failures == []
    assert sent >= 250
    assert served.server.alive()
    assert after < 1.05 * before, f"server memory grew from {before >> 20} MiB to {after >> 20} MiB"
    good = [1, 5, 9, 13]
    want = served.offline.generate([good], SamplingParams(max_new_tokens=6))[0].token_ids
    status, answer = post(url, json.dumps({"input_ids": good, "request_output_len": 6,
                                           "exclude_input_in_output": True}).encode())
    assert status == 200 and answer["output_ids"] == want


# --- exposure --------------------------------------------------------------------------------------

def test_serve_binds_loopback_by_default_and_warns_beyond_it(tmp_path, capsys):
    from redrafter.cli import build_parser, main

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert not any(exposed(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert all(exposed(h) for h in ("0.0.0.0", "::", "192.168.1.7", "example.org"))
    # the warning comes before the server starts (here it cannot: the repository is empty)
    assert main(["serve", "--repository", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "warning: binding 0.0.0.0 makes the server reachable from other machines" in err
    assert "no authentication" in err and "not a Triton model repository" in err
    assert main(["serve", "--repository", str(tmp_path)]) == 2
    assert "warning" not in capsys.readouterr().err


def test_opening_an_engine_unpickles_nothing(served, monkeypatch):
    """Weights are safetensors, the tokenizer JSON, the config JSON: loading runs no pickle
    (which would execute whatever an engine directory's author put in it)."""
    import pickle

    import torch

    from redrafter.serving.repository import read_repository

    events: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "pickle.find_class" and watching.is_set():
            events.append(f"{args[0]}.{args[1]}")

    watching = threading.Event()
    sys.addaudithook(audit)  # audit hooks cannot be removed: this one only listens while watching
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load on the load path"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load on the load path"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads on the load path"))
    watching.set()
    try:
        [source] = read_repository(served.repository).values()
        source.check()
        session = source.open_session()
        session.close()
    finally:
        watching.clear()
    assert events == []


# --- faults: the model instance killed, the engine damaged -----------------------------------------

class LongStream:
    """One long generation over gRPC, read response by response."""

    def __init__(self, url: str, ids: list[int], max_new: int):
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(
            callback=lambda result, error: self.responses.put((time.monotonic(), result, error)))
        inputs = dict(input_ids=np.array([ids], np.int32), request_output_len=np.array([[max_new]], np.int32),
                      streaming=np.array([[True]]))
        self.client.async_stream_infer(MODEL, grpc_tensors(inputs))
        self.tokens: list[int] = []
        self.final = False
        self.arrived = 0.0  # when the last response read arrived (time.monotonic)

    def read(self, timeout: float = 60) -> Exception | None:
        """One response: its error, or None (tokens appended, final noted)."""
        self.arrived, result, error = self.responses.get(timeout=timeout)
        if error is None:
            self.tokens += result.as_numpy("output_ids").reshape(-1).tolist()
            self.final = result.get_response().parameters["triton_final_response"].bool_param
        return error

    def close(self) -> None:
        try:
            self.client.stop_stream(cancel_requests=True)
        finally:
            self.client.close()


def wait_for(log: Path, text: str, proc: subprocess.Popen, count: int = 1, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while (out := log.read_text()).count(text) < count:
        assert proc.poll() is None or out.count(text) >= count, f"serve exited {proc.returncode}:\n{out[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{out[-3000:]}"
        time.sleep(0.2)
    return out


def test_serve_restarts_a_killed_instance_and_refuses_an_engine_damaged_while_serving(served, tmp_path):
    """(a) SIGKILL of the model instance mid-stream: the stream ends with an error, not a hang;
    `serve` says what happened, restarts, and serves again. (b) The engine modified in place,
    then removed, while streams run: they finish with the right tokens (the instance holds what
    it loaded); the next restart refuses the engine with a clear error."""
    engine = shutil.copytree(served.engine, tmp_path / "engine")
    http_port, grpc_port, metrics_port = free_ports(3)
    log = tmp_path / "serve.log"
    # One thread: on a CPU shared with other jobs two spinning OpenMP pools make steps 10x slower.
    with open(log, "w") as out:
        cli = subprocess.Popen([sys.executable, "-m", "redrafter.cli", "serve", "--engine", str(engine),
                                "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                                "--metrics-port", str(metrics_port), "--threads", "1"],
                               stdout=out, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{grpc_port}"
    ids = [1, 17, 923, 4051, 77]
    max_new = 200  # long enough to be in flight when the kill or the damage lands (both asserted)
    want = served.offline.generate([ids], SamplingParams(max_new_tokens=max_new))[0].token_ids

    def instance() -> int:
        [server] = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).endswith(
            f"\0{metrics_port}\0".encode()) and _cmdline(p).split(b"\0")[0].endswith(b"tritonserver")]
        [stub] = stub_processes(int(server))
        return stub

    try:
        wait_for(log, "ready:", cli)
        # (a) the instance killed while a stream is in flight
        victim = instance()
        assert b"\0OMP_NUM_THREADS=1\0" in b"\0" + Path(f"/proc/{victim}/environ").read_bytes()  # --threads 1
        s = LongStream(url, ids, max_new)
        assert s.read() is None and not s.final  # the stream is running
        os.kill(victim, signal.SIGKILL)
        error = None
        while error is None:
            assert not s.final, "the stream finished before the kill landed: nothing was in flight"
            error = s.read(timeout=60)  # queue.Empty here would be the hang Triton leaves alone
        s.close()
        out = wait_for(log, "ready:", cli, count=2)
        assert f"the model instance process {victim} killed by SIGKILL" in out and "restarting tritonserver" in out
        again = LongStream(url, ids, 12)
        while again.read() is None and not again.final:
            pass
        again.close()
        assert again.final and again.tokens == want[:12]

        # (b) the engine modified in place, then removed, under running streams
        for damage in (lambda: (engine / "tokenizer" / "tokenizer.json").write_text("{}"),
                       lambda: shutil.rmtree(engine)):
            s = LongStream(url, ids, max_new)
            assert s.read() is None and not s.final
            damage()
            damaged = time.monotonic()
            while not s.final:
                assert s.read() is None
            s.close()
            assert s.arrived > damaged  # it was still running when the damage landed
            assert s.tokens == want
        os.kill(instance(), signal.SIGKILL)  # the next restart must refuse the damaged engine
        assert cli.wait(timeout=60) == 1
        assert f"cannot restart: {str(engine)!r} is not an engine directory" in log.read_text()
    finally:
        if cli.poll() is None:
            cli.terminate()
            try:
                cli.wait(timeout=60)
            except subprocess.TimeoutExpired:
                cli.kill()


def test_serve_refuses_a_damaged_engine_before_starting(served, tmp_path, capsys):
    from redrafter.cli import main

    engine = shutil.copytree(served.engine, tmp_path / "engine")
    with open(engine / "drafter.safetensors", "r+b") as f:  # one flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert main(["serve", "--engine", str(engine)]) == 2
    assert "checksum mismatch for engine file 'drafter.safetensors'" in capsys.readouterr().err
    shutil.rmtree(engine)
    assert main(["serve", "--engine", str(engine)]) == 2
    assert "is not an engine directory" in capsys.readouterr().err


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# --- faults: `redrafter build` and `redrafter train` killed ----------------------------------------

def _cli(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "redrafter.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **popen)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    """SIGKILL `proc` as soon as ready() holds (polled every few ms)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"it ended before the kill:\n{proc.stdout.read().decode()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    proc.stdout.close()


def test_build_killed_at_each_stage_or_out_of_disk_keeps_the_old_engine(tiny_hf_dir, tmp_path):
    from redrafter.builder.build import BuildOptions, build_engine
    from redrafter.builder.engine import read_config

    base, drafter = tiny_hf_dir
    out = build_engine(BuildOptions(output=tmp_path / "engine", base=base, drafter=drafter, backend="eager",
                                    decode=DecodeConfig(beam_width=2, beam_length=3), max_seq_len=128, progress=False))
    old = read_config(out)
    args = ["build", "--base", str(base), "--drafter", str(drafter), "--backend", "eager", "--beam-width", "3",
            "--max-seq-len", "128", "--output", str(out), "--no-progress"]

    def building(name: str):
        return lambda: any((d / name).exists() for d in tmp_path.glob(".engine.tmp-*"))

    for stage in ("", "base.safetensors", "drafter.safetensors", "tokenizer"):  # "": its directory exists
        _kill_when(_cli(*args), building(stage))
        assert read_config(out) == old  # the old engine, whole (read_config checks every file's checksum)
    assert list(tmp_path.glob(".engine.tmp-*"))  # SIGKILL left its temporary directory...

    def small_files() -> None:  # a 1 MiB file-size limit: writes past it fail as on a full disk
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    full = _cli(*args, preexec_fn=small_files)
    message = full.communicate(timeout=180)[0].decode()
    assert full.returncode == 2 and "redrafter build: error: out of disk space writing the engine" in message, message
    assert "Traceback" not in message and "unchanged" in message
    assert read_config(out) == old
    assert not list(tmp_path.glob(".engine.tmp-*"))  # ...which the next build removed; its own too

    build_engine(BuildOptions(output=out, base=base, drafter=drafter, backend="eager",
                              decode=DecodeConfig(beam_width=3, beam_length=3), max_seq_len=128, progress=False))
    assert read_config(out)["build"]["decode"]["beam_width"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_train_sigkilled_mid_epoch_resumes_bitwise(tmp_path, tiny_hf_dir):
    """A real SIGKILL of a `redrafter train` process between checkpoints, then the same command
    with --resume: the same weights and loss curve as a run never interrupted (both of those
    run in this process: the same CLI code, without another interpreter to start)."""
    from safetensors.torch import load_file

    import torch

    from redrafter.cli import main
    from test_training import _write_jsonl

    base, _ = tiny_hf_dir
    data = _write_jsonl(tmp_path / "convs.jsonl")
    args = ["train", "--base", str(base), "--data", str(data), "--seq-len", "64", "--epochs", "2", "--batch-size",
            "16", "--draft-len", "2", "--lr", "3e-3", "--cache-dir", str(tmp_path / "cache"), "--checkpoint-every", "3"]
    assert main([*args, "--output", str(tmp_path / "full")]) == 0
    steps = json.loads((tmp_path / "full" / "metrics.json").read_text())["steps"]
    assert steps >= 12  # room to be killed mid-epoch, past a checkpoint

    state = tmp_path / "parts" / "checkpoint" / "trainer_state.json"

    def past_a_checkpoint() -> bool:
        try:
            return json.loads(state.read_text())["step"] >= 6
        except (OSError, ValueError):
            return False

    _kill_when(_cli(*args, "--output", str(tmp_path / "parts")), past_a_checkpoint)
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at < steps and not (tmp_path / "parts" / "model.safetensors").exists()
    assert main([*args, "--output", str(tmp_path / "parts"), "--resume"]) == 0
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "parts" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "full" / "metrics.json").read_text())["history"]
    hb = json.loads((tmp_path / "parts" / "metrics.json").read_text())["history"]
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


# --- load -------------------------------------------------------------------------------------------

def _loadtest_args(served, engine: Path, requests: int, concurrency: int) -> list[str]:
    return ["loadtest", "--engine", str(engine), "--host", "127.0.0.1", "--http-port", str(served.server.http_port),
            "--grpc-port", str(served.server.grpc_port), "--metrics-port", str(served.server.metrics_port),
            "--requests", str(requests), "--concurrency", str(concurrency), "--max-tokens", "8", "--json"]


def test_loadtest_mixed_clients_with_cancellations_lose_nothing_and_match_the_offline_session(served, capsys):
    from redrafter.cli import main

    status = main(_loadtest_args(served, served.engine, 40, 8))
    report = json.loads(capsys.readouterr().out)
    assert report["violations"] == [] and status == 0
    assert report["completed"] + report["cancelled"] == 40 and report["cancelled"] >= 1
    assert report["lost"] == report["error"] == report["differing"] == 0
    assert all(report["kinds"].values()) and 0 < report["sampled"] < 40
    assert report["rss_end_mib"] is not None  # the server's memory was measured


def test_loadtest_reports_answers_that_differ(served, tiny_hf_dir, tmp_path, capsys):
    """The check can fail: against another engine's expected answers every answer differs."""
    from conftest import tiny_llama

    from redrafter.builder.build import BuildOptions, build_engine
    from redrafter.cli import main
    from redrafter.runtime.loading import save_hf_checkpoint

    base, _ = tiny_hf_dir
    other = save_hf_checkpoint(tiny_llama(tied=True, seed=5, vocab=VOCAB, eos_token_ids=[2], bos_token_id=1),
                               tmp_path / "other", tokenizer_dir=base)
    engine = build_engine(BuildOptions(output=tmp_path / "engine", base=other, drafter="none", backend="eager",
                                       max_seq_len=MAX_SEQ_LEN, progress=False))
    assert main([*_loadtest_args(served, engine, 6, 3), "--cancel-fraction", "0"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["differing"] == report["completed"] == 6
    assert any("differ from the offline Session" in v for v in report["violations"])
