"""`redrafter loadtest`: drive a running redrafter Triton server with many concurrent clients
and check that it stays correct and leaks nothing.

N requests over C concurrent clients, mixing HTTP generate, HTTP generate_stream and gRPC
streaming (token level), greedy and seeded sampling, with a fraction of the streaming ones
abandoned after their first response (the client hangs up). Then it checks:
- every request completed or was cancelled, counted by request id: none failed, none lost
  (no answer within --timeout: a hang);
- every completed answer equals what the offline Session of the same engine gives (greedy:
  the same engine decodes the same tokens; seeded sampling: the n-th token uses the n-th
  uniform of the seed's stream, whatever the batch);
- the server's metrics return to idle (no request running or waiting: no slot leaks) and
  every request it received has finished;
- the server's resident memory (tritonserver + its model instances, when they run on this
  machine) grows by less than 5% between the end of the warm-up and the end.
It prints a summary (counts, latency percentiles, memory) and exits 1 on any violation.

Expected answers are computed first, for each distinct (prompt, sampling) pair of the
workload, by a Session opened on --engine in this process and closed before the load.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np

MAX_RSS_GROWTH = 0.05
IDLE_TIMEOUT_S = 30.0
PROMPTS = [
    "What is the capital of France?", "Write a haiku about speculative decoding.", "List three prime numbers.",
    "Explain recursion to a child.", "Give me a recipe for pancakes.", "What does a compiler do?",
    "Name the planets of the solar system.", "Why is the sky blue?", "Translate 'good morning' into Spanish.",
    "Summarize the plot of Hamlet in two sentences.", "How do vaccines work?", "Suggest a name for a cat.",
    "What is 17 times 23?", "Describe the water cycle.", "Write a limerick about a robot.",
    "What are the benefits of exercise?",
]
SEEDS = (0, 7, 12345)
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9)
KINDS = ("http", "http_stream", "grpc_stream")


@dataclass(frozen=True)
class Job:
    rid: str
    prompt: int  # index into PROMPTS
    seed: int | None  # None: greedy
    kind: str
    cancel: bool  # hang up after the first response (streaming kinds)


@dataclass
class Outcome:
    job: Job
    status: str = "lost"  # completed | cancelled | error | lost
    latency_s: float = 0.0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    detail: str = ""


def plan(n: int, cancel_fraction: float, seed: int) -> list[Job]:
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        sampled = rng.random() < 0.5
        jobs.append(Job(f"load-{i}", int(rng.integers(len(PROMPTS))),
                        int(SEEDS[int(rng.integers(len(SEEDS)))]) if sampled else None, kind,
                        cancel=kind != "http" and rng.random() < cancel_fraction * len(KINDS) / 2))
    return jobs


def sampling_params(seed: int | None, max_tokens: int):
    from redrafter.runtime.sampling import SamplingParams

    if seed is None:
        return SamplingParams(max_new_tokens=max_tokens)
    # the server receives FP32 numbers: use the same values
    return SamplingParams(max_new_tokens=max_tokens, temperature=float(np.float32(SAMPLING["temperature"])),
                          top_k=SAMPLING["top_k"], top_p=float(np.float32(SAMPLING["top_p"])), seed=seed)


def expected_answers(engine: str, jobs: list[Job], max_tokens: int) -> tuple[dict, list[list[int]]]:
    """(answers by (prompt, seed), each prompt's token ids as the server's chat template makes them)."""
    from redrafter.builder.engine import open_session
    from redrafter.runtime.pipeline import encode_chat

    keys = sorted({(j.prompt, j.seed) for j in jobs}, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    with open_session(engine) as session:
        ids = [encode_chat(session.tokenizer, p) for p in PROMPTS]
        outs = session.generate([PROMPTS[p] for p, _ in keys], [sampling_params(s, max_tokens) for _, s in keys])
    return {k: (o.token_ids, o.text) for k, o in zip(keys, outs)}, ids


class Client:
    def __init__(self, host: str, http_port: int, grpc_port: int, model: str, max_tokens: int, timeout_s: float,
                 prompt_ids: list[list[int]]):
        self.host, self.http_port, self.grpc_port, self.model = host, http_port, grpc_port, model
        self.max_tokens, self.timeout_s, self.prompt_ids = max_tokens, timeout_s, prompt_ids

    def run(self, job: Job) -> Outcome:
        out = Outcome(job)
        t0 = time.perf_counter()
        try:
            {"http": self._http, "http_stream": self._http_stream, "grpc_stream": self._grpc}[job.kind](job, out)
        except (socket.timeout, TimeoutError, queue.Empty) as e:
            out.status, out.detail = "lost", f"no answer within {self.timeout_s:.0f} s ({type(e).__name__})"
        except Exception as e:  # the server refused or dropped it
            out.status, out.detail = "error", f"{type(e).__name__}: {e}"[:500]
        out.latency_s = time.perf_counter() - t0
        return out

    def _body(self, job: Job, stream: bool) -> bytes:
        body = {"text_input": PROMPTS[job.prompt], "max_tokens": self.max_tokens, "id": job.rid}
        if stream:
            body["stream"] = True
        if job.seed is not None:
            body |= dict(SAMPLING, random_seed=job.seed)
        return json.dumps(body).encode()

    def _http(self, job: Job, out: Outcome) -> None:
        req = urllib.request.Request(f"http://{self.host}:{self.http_port}/v2/models/{self.model}/generate",
                                     data=self._body(job, False), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
            answer = json.loads(r.read())
        out.text, out.status = answer["text_output"], "completed"

    def _http_stream(self, job: Job, out: Outcome) -> None:
        conn = http.client.HTTPConnection(self.host, self.http_port, timeout=self.timeout_s)
        try:
            conn.request("POST", f"/v2/models/{self.model}/generate_stream", body=self._body(job, True),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
            pieces, final = [], False
            for line in response:
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                pieces.append(event.get("text_output", ""))
                final = "finish_reason" in event
                if job.cancel and not final:
                    conn.sock.shutdown(socket.SHUT_RDWR)  # hang up mid-stream
                    out.status = "cancelled"
                    return
            if not final:
                raise RuntimeError("the stream ended without its final event")
            out.text, out.status = "".join(pieces), "completed"
        finally:
            conn.close()

    def _grpc(self, job: Job, out: Outcome) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"{self.host}:{self.grpc_port}")
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            inputs = dict(input_ids=np.array([self.prompt_ids[job.prompt]], np.int32),
                          request_output_len=np.array([[self.max_tokens]], np.int32), streaming=np.array([[True]]))
            if job.seed is not None:
                inputs |= dict(temperature=np.array([[SAMPLING["temperature"]]], np.float32),
                               runtime_top_k=np.array([[SAMPLING["top_k"]]], np.int32),
                               runtime_top_p=np.array([[SAMPLING["top_p"]]], np.float32),
                               random_seed=np.array([[job.seed]], np.uint64))
            tensors = []
            for name, value in inputs.items():
                t = grpcclient.InferInput(name, list(value.shape), _triton_dtype(value.dtype))
                t.set_data_from_numpy(value)
                tensors.append(t)
            client.async_stream_infer(self.model, tensors, request_id=job.rid)
            deadline = time.monotonic() + self.timeout_s
            while True:
                result, error = responses.get(timeout=max(0.0, deadline - time.monotonic()))
                if error is not None:
                    raise RuntimeError(str(error))
                out.token_ids += result.as_numpy("output_ids").reshape(-1).tolist()
                if result.get_response().parameters["triton_final_response"].bool_param:
                    out.status = "completed"
                    return
                if job.cancel:
                    client.stop_stream(cancel_requests=True)
                    out.status = "cancelled"
                    return
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()


def _triton_dtype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)


def server_processes(http_port: int) -> list[int]:
    """tritonserver listening on http_port (found by its command line) and its stub processes;
    empty when it does not run on this machine."""
    from .server import stub_processes

    want = f"--http-port\0{http_port}\0".encode()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.split(b"\0")[0].endswith(b"tritonserver") and want in cmd:
            return [int(entry), *stub_processes(int(entry))]
    return []


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def session_metrics(url: str) -> dict[str, float]:
    """The redrafter series summed over instances: running, waiting, finished (all reasons)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        lines = r.read().decode().splitlines()
    sums = {"running": 0.0, "waiting": 0.0, "finished": 0.0}
    for line in lines:
        if line.startswith("redrafter_requests{"):
            state = "running" if 'state="running"' in line else "waiting"
            sums[state] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("redrafter_requests_finished{"):
            sums["finished"] += float(line.rsplit(" ", 1)[1])
    return sums


def run_phase(client: Client, jobs: list[Job], concurrency: int) -> list[Outcome]:
    todo = iter(jobs)
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def worker() -> None:
        while True:
            with lock:
                job = next(todo, None)
            if job is None:
                return
            outcome = client.run(job)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, len(jobs)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def loadtest(args: argparse.Namespace) -> dict:
    """Run the load and the checks; returns the report (report["violations"] empty: passed)."""
    jobs = plan(args.requests, args.cancel_fraction, args.seed)
    want, prompt_ids = expected_answers(args.engine, jobs, args.max_tokens)
    client = Client(args.host, args.http_port, args.grpc_port, args.model, args.max_tokens, args.timeout,
                    prompt_ids)
    metrics_url = f"http://{args.host}:{args.metrics_port}/metrics"
    pids = server_processes(args.http_port)
    time.sleep(0.6)  # the model publishes its metrics every 0.5 s
    finished_before = session_metrics(metrics_url)["finished"]
    warmup = min(len(jobs), max(args.concurrency, len(jobs) // 10))
    t0 = time.perf_counter()
    outcomes = run_phase(client, jobs[:warmup], args.concurrency)
    rss_warm = rss_bytes(pids)
    outcomes += run_phase(client, jobs[warmup:], args.concurrency)
    wall = time.perf_counter() - t0

    violations: list[str] = []
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while (m := session_metrics(metrics_url))["running"] or m["waiting"]:
        if time.monotonic() > deadline:
            violations.append(f"the server is not idle {IDLE_TIMEOUT_S:.0f} s after the load: {m}")
            break
        time.sleep(0.25)
    time.sleep(0.6)
    m = session_metrics(metrics_url)
    rss_end = rss_bytes(pids)

    by_id = {o.job.rid: o for o in outcomes}
    counts = {s: sum(o.status == s for o in outcomes) for s in ("completed", "cancelled", "error", "lost")}
    counts["lost"] += len(jobs) - len(by_id)  # a request with no outcome at all
    differing = []
    for o in outcomes:
        if o.status != "completed":
            continue
        ids, text = want[(o.job.prompt, o.job.seed)]
        if (o.token_ids != ids) if o.job.kind == "grpc_stream" else (o.text != text):
            differing.append(o.job.rid)
    finished = m["finished"] - finished_before
    if counts["lost"]:
        violations.append(f"{counts['lost']} requests lost (no answer within {args.timeout:.0f} s): "
                          f"{[o.job.rid for o in outcomes if o.status == 'lost'][:10]}")
    if counts["error"]:
        violations.append(f"{counts['error']} requests failed, e.g. "
                          f"{next(o.detail for o in outcomes if o.status == 'error')}")
    if differing:
        violations.append(f"{len(differing)} answers differ from the offline Session's: {differing[:10]}")
    if not len(jobs) - counts["cancelled"] <= finished <= len(jobs):
        violations.append(f"the server finished {finished:.0f} requests of the {len(jobs)} sent "
                          f"({counts['cancelled']} of them cancelled)")
    if pids and rss_end > (1 + MAX_RSS_GROWTH) * rss_warm:
        violations.append(f"server memory grew {100 * (rss_end / rss_warm - 1):.1f}% after the warm-up "
                          f"({rss_warm >> 20} -> {rss_end >> 20} MiB)")
    latencies = sorted(o.latency_s for o in outcomes if o.status == "completed")
    pct = (lambda q: float(np.percentile(latencies, q)) if latencies else float("nan"))
    return {
        "requests": len(jobs), "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "kinds": {k: sum(j.kind == k for j in jobs) for k in KINDS},
        "sampled": sum(j.seed is not None for j in jobs), **counts, "differing": len(differing),
        "server_finished": int(finished), "wall_s": round(wall, 1),
        "latency_p50_s": round(pct(50), 3), "latency_p99_s": round(pct(99), 3),
        "rss_after_warmup_mib": rss_warm >> 20 if pids else None, "rss_end_mib": rss_end >> 20 if pids else None,
        "violations": violations,
    }


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loadtest", help="drive a running `redrafter serve` with concurrent clients and check it",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, help="the engine the server serves (expected answers come from it)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--model", default="redrafter", help="model name in the repository")
    p.add_argument("--requests", type=int, default=100, help="requests in all (N)")
    p.add_argument("--concurrency", type=int, default=8, help="clients sending at once (C)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens each request asks for")
    p.add_argument("--cancel-fraction", type=float, default=0.1,
                   help="share of all requests that hang up after their first response (streaming ones only)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds after which a request counts as lost")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload's mix")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1 or not 0 <= args.cancel_fraction <= 1:
        raise ValueError("--requests, --concurrency and --max-tokens must be >= 1 and --cancel-fraction in [0, 1]")
    if find_spec("tritonclient") is None:
        raise ValueError("loadtest needs the Triton client: pip install 'tritonclient[http,grpc]'")
    report = loadtest(args)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 1 if report["violations"] else 0


def _print(r: dict) -> None:
    kinds = ", ".join(f"{v} {k}" for k, v in r["kinds"].items())
    print(f"{r['requests']} requests over {r['concurrency']} clients ({kinds}; {r['sampled']} seeded sampling), "
          f"max_tokens {r['max_tokens']}, {r['wall_s']} s")
    print(f"completed {r['completed']}, cancelled {r['cancelled']}, failed {r['error']}, lost {r['lost']}, "
          f"differing from the offline Session {r['differing']}; the server finished {r['server_finished']}")
    print(f"latency of completed requests: p50 {r['latency_p50_s']} s, p99 {r['latency_p99_s']} s")
    if r["rss_end_mib"] is not None:
        print(f"server resident memory: {r['rss_after_warmup_mib']} MiB after the warm-up, {r['rss_end_mib']} MiB "
              "at the end")
    else:
        print("server resident memory: not checked (the server does not run on this machine)")
    for v in r["violations"]:
        print(f"VIOLATION: {v}")
    print("PASS" if not r["violations"] else "FAIL", flush=True)
    sys.stdout.flush()

