"""`redrafter triton-repo` (write a Triton model repository) and `redrafter serve` (run
tritonserver on one, and restart it when a model instance's process dies)."""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

WATCH_S = 0.5  # how often `serve` looks at the server and its model instances
MAX_RESTARTS = 3  # within RESTART_WINDOW_S: more means the instance cannot stay up, so `serve` gives up
RESTART_WINDOW_S = 600.0


def register(sub: argparse._SubParsersAction) -> None:
    from . import loadtest

    repo = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository for an engine")
    _add_source_args(repo)
    repo.add_argument("--output", required=True, help="repository directory to write (an existing one is replaced)")
    repo.set_defaults(func=run_repo)

    serve = sub.add_parser("serve", help="serve an engine with Triton Inference Server (HTTP, gRPC, metrics)")
    _add_source_args(serve, repository=True)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default loopback only; 0.0.0.0 exposes the server, which has no "
                            "authentication, to the network: put an authenticating proxy in front instead)")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the model to load")
    serve.add_argument("--threads", type=int, default=0,
                       help="torch CPU threads per model instance (default: torch's, one per core); 1 keeps decoder "
                            "steps fast on a CPU shared with other busy processes, where spinning thread pools stall")
    serve.set_defaults(func=run_serve)
    loadtest.register(sub)


def _add_source_args(p: argparse.ArgumentParser, repository: bool = False) -> None:
    from redrafter.runtime import config

    what = p.add_mutually_exclusive_group()
    what.add_argument("--engine", help="engine directory built by `redrafter build`")
    what.add_argument("--base", help="serve a base model directly (HF dir, .gguf or 'default'), "
                                     "without building an engine; the default when nothing is given")
    if repository:
        what.add_argument("--repository", help="serve a repository written by `redrafter triton-repo`")
    p.add_argument("--drafter", default="default", help="with --base: drafter dir, 'default' or 'none'")
    p.add_argument("--name", default="redrafter", help="model name in the repository")
    p.add_argument("--instances", type=int, default=1,
                   help="model instances (each a process with its own copy of the weights)")
    p.add_argument("--max-batch-size", type=int, default=0,
                   help="requests decoded together per instance (default: the engine's; 8 with --base)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="with --base: longest prompt + completion")
    config.add_arguments(p, plain=False)  # with --engine: within its built setting (the default)
    p.add_argument("--beam-policy", default="adaptive", choices=["fixed", "adaptive"],
                   help="adaptive (default): plain decoding or beam shapes up to W x L, whichever "
                        "runs fastest at each batch size; fixed: always W x L")


def _write(args: argparse.Namespace, output: Path) -> Path:
    from .repository import ModelSource, write_repository

    from redrafter.runtime.config import DecodeConfig, from_args, given

    base = args.base if args.base or args.engine else "default"
    decode = None
    if given(args):
        from redrafter.builder.engine import built_decode

        decode = from_args(args, built_decode(args.engine) if args.engine else DecodeConfig.for_device("cpu"))
    source = ModelSource.create(engine=args.engine, base=base, drafter=args.drafter if base else None,
                                max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                                decode=decode, beam_policy=args.beam_policy)
    return write_repository(output, source, name=args.name, instances=args.instances)


def run_repo(args: argparse.Namespace) -> int:
    out = _write(args, Path(args.output))
    print(f"wrote Triton model repository {out} (model {args.name!r}); serve it with "
          f"`redrafter serve --repository {out}`")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from .repository import read_repository
    from .server import TritonServer, exposed

    with tempfile.TemporaryDirectory(prefix="redrafter-repo-") as tmp:
        repo = Path(args.repository) if args.repository else _write(args, Path(tmp) / "repository")
        for source in read_repository(repo).values():
            source.check()  # a damaged engine is refused here, with the loader's message
        if exposed(args.host):
            print(f"redrafter serve: warning: binding {args.host} makes the server reachable from other machines, "
                  "and it has no authentication: anyone who can connect can run the model. Keep it on 127.0.0.1 "
                  "behind a reverse proxy that authenticates (README, Serving).", file=sys.stderr, flush=True)
        if args.threads < 0:
            raise ValueError(f"--threads {args.threads} must be >= 0 (0: torch's default)")
        server = TritonServer(repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, threads=args.threads)
        signal.signal(signal.SIGTERM, _interrupt)
        restarts: list[float] = []
        try:
            while True:
                server.start(ready_timeout_s=args.ready_timeout)
                print(f"redrafter serve: ready: HTTP {server.http_url}, gRPC {server.grpc_url}, "
                      f"metrics {server.metrics_url} (Ctrl-C stops)", file=sys.stderr, flush=True)
                dead = _watch(server)
                if dead is None:
                    print(f"redrafter serve: tritonserver exited with status {server.proc.returncode}",
                          file=sys.stderr)
                    return 1
                print(f"redrafter serve: {dead}; redrafter restarts tritonserver: requests in flight end with a "
                      "closed connection; retry them.", file=sys.stderr, flush=True)
                server.stop(graceful=False)
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(restarts) > MAX_RESTARTS:
                    print(f"redrafter serve: error: {len(restarts)} restarts within {RESTART_WINDOW_S:.0f} s: "
                          "not restarting again (see the messages above)", file=sys.stderr)
                    return 1
                try:
                    for source in read_repository(repo).values():
                        source.check()
                except (ValueError, FileNotFoundError) as e:
                    print(f"redrafter serve: error: cannot restart: {e}", file=sys.stderr)
                    return 1
                print("redrafter serve: restarting tritonserver", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            return 0
        except (RuntimeError, TimeoutError) as e:
            print(f"redrafter serve: error: {e}", file=sys.stderr)
            return 1
        finally:
            server.stop()


def _watch(server) -> str | None:
    """Block until tritonserver exits on its own (None) or something dies that calls for a
    restart (what happened): tritonserver killed by a signal (a crash), or a model instance's
    stub process, which Triton's Python backend neither restarts nor reports (serving/server.py)."""
    while server.alive():
        dead = server.dead_stub()
        if dead is not None:
            pid, how = dead
            return (f"the model instance process {pid} {how}: Triton's Python backend neither restarts it "
                    "nor ends the requests it was serving")
        time.sleep(WATCH_S)
    status = server.proc.returncode
    if status < 0:
        return f"tritonserver was killed by signal {-status} ({signal.strsignal(-status)})"
    return None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
