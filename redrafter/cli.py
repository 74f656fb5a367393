"""`redrafter` command line: one subcommand per product part."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="default", help="HF checkpoint dir, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--drafter", default="default", help="drafter dir (Apple layout) or 'default' (our shipped drafter)")
    p.add_argument("--beam-width", type=int, default=4, help="W: beams drafted per step")
    p.add_argument("--beam-length", type=int, default=4,
                   help="L: tokens per beam, counting the guaranteed token (L-1 drafted tokens)")
    p.add_argument("--no-spec", action="store_true", help="plain greedy decoding, no drafter")


def _generate(args: argparse.Namespace) -> int:
    from redrafter.runtime.decoding import Decoder, generate
    from redrafter.runtime.pipeline import load

    loaded = load(args.base, None if args.no_spec else args.drafter)
    prompt = loaded.encode_chat(args.prompt)
    decoder = Decoder(loaded.model, loaded.drafter, max_batch=1, max_seq_len=len(prompt) + args.max_new_tokens,
                      beam_width=args.beam_width, beam_length=args.beam_length)
    t0 = time.perf_counter()
    out = generate(decoder, [prompt], args.max_new_tokens, loaded.eos_ids)[0]
    seconds = time.perf_counter() - t0
    text = loaded.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    summary = {
        "text": text, "token_ids": out.token_ids, "tokens": len(out.token_ids), "steps": out.steps,
        "tokens_per_step": round(out.tokens_per_step, 3), "tok_per_s": round(len(out.token_ids) / seconds, 2),
        "time_to_first_token_s": round(out.prefill_s, 4), "seconds": round(seconds, 3),
        "speculative": decoder.speculative, "beam_width": args.beam_width, "beam_length": args.beam_length,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(text)
        print(f"[{summary['tokens']} tokens, {out.steps} steps, {summary['tokens_per_step']} tokens/step, "
              f"{summary['tok_per_s']} tok/s]")
    return 0


# Each module adds its own subcommand with `register(subparsers)`.
SUBCOMMANDS: list[str] = ["redrafter.bench", "redrafter.training.cli", "redrafter.builder.cli", "redrafter.serving.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="redrafter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(sub)
    g = sub.add_parser("generate", help="generate a completion for one prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_model_args(g)
    g.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"redrafter {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
