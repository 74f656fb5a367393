"""`redrafter` command line: one subcommand per product part."""
from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redrafter.runtime.session import Session


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from redrafter.runtime import config

    p.add_argument("--engine", help="engine directory built by `redrafter build` (instead of --base and --drafter); "
                                    "decoding flags choose a setting within the one it was built for")
    p.add_argument("--base", help="HF checkpoint dir, .gguf file, or 'default' (SmolLM2-135M-Instruct; the default)")
    p.add_argument("--drafter", help="drafter dir (Apple layout) or 'default' (our shipped drafter; the default)")
    config.add_arguments(p)


def _session(args: argparse.Namespace) -> Session:
    """A one-slot Session over --engine, or over --base and --drafter."""
    from redrafter.runtime.config import DecodeConfig, from_args
    from redrafter.runtime.session import Session

    if args.engine:
        fixed = [flag for flag, value in (("--base", args.base), ("--drafter", args.drafter),
                                          ("--max-seq-len", args.max_seq_len)) if value is not None]
        if fixed:
            raise ValueError(f"--engine fixes the base model, drafter and max_seq_len it was built with: drop "
                             f"{', '.join(fixed)}")
        from redrafter.builder.engine import built_decode, open_session

        return open_session(args.engine, max_batch_size=1, decode=from_args(args, built_decode(args.engine)))
    length = {"max_seq_len": args.max_seq_len} if args.max_seq_len else {}  # else Session.load's default
    return Session.load(args.base or "default", None if args.no_spec else args.drafter or "default", max_batch_size=1,
                        decode=from_args(args, DecodeConfig.for_device("cpu")), **length)


def _generate(args: argparse.Namespace) -> int:
    from redrafter.runtime.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    with _session(args) as session:
        t0 = time.perf_counter()
        token_ids: list[int] = []
        pieces: list[str] = []
        for delta in session.stream(args.prompt, params):
            token_ids += delta.token_ids
            pieces.append(delta.text)
            if not args.json:
                print(delta.text, end="", flush=True)
            if delta.finish_reason == "error":
                raise ValueError(f"generation failed: {delta.error}")
        seconds = time.perf_counter() - t0
        m = session.metrics()
        speculative = session.decoder.speculative
        c = session.decoder.config
    summary = {
        "text": "".join(pieces), "token_ids": token_ids, "tokens": len(token_ids), "steps": m["steps"],
        "tokens_per_step": round(m["tokens_per_step"], 3), "tok_per_s": round(len(token_ids) / seconds, 2),
        "time_to_first_token_s": round(m["ttft_s"]["mean"], 4), "seconds": round(seconds, 3),
        "finish_reason": delta.finish_reason, "speculative": speculative, "beam_width": c.beam_width,
        "beam_length": c.beam_length, "lookup_ngram": c.lookup_ngram,
        "lookup_length": c.step_length if c.lookup_ngram else 0, "tree": c.tree,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"\n[{summary['tokens']} tokens, {summary['steps']} steps, {summary['tokens_per_step']} tokens/step, "
              f"{summary['tok_per_s']} tok/s]")
    return 0


# Each module adds its own subcommand with `register(subparsers)`.
SUBCOMMANDS: list[str] = ["redrafter.bench", "redrafter.training.cli", "redrafter.builder.cli", "redrafter.serving.cli"]


def build_parser() -> argparse.ArgumentParser:
    from redrafter.runtime.config import counts

    parser = argparse.ArgumentParser(prog="redrafter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(sub)
    g = sub.add_parser("generate", help="generate a completion for one prompt (streamed)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=counts(1, many=False), default=128)
    g.add_argument("--max-seq-len", type=counts(1, many=False),
                   help="prompt + generated tokens the session holds (default 2048)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: exact sampling")
    g.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0: no nucleus filter")
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed (same seed, same tokens, with or without drafting)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _add_model_args(g)
    g.set_defaults(func=_generate)
    return parser


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (`timeout`, a scheduler's preemption) stops like Ctrl-C: files are closed on the way
    # out. Background jobs of a script inherit SIGINT ignored, so `timeout -s INT` may not reach them.
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"redrafter {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = {"train": "; its last checkpoint is kept: add --resume to the same command to go on",
                  "self-data": "; the answers so far are kept: run the same command again to go on"}
        print(f"redrafter {args.command}: interrupted{resume.get(args.command, '')}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
