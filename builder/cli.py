"""`redrafter build`: base model + drafter -> engine directory."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from redrafter.runtime import config

    from . import BACKENDS, DTYPE_NAMES, MAX_BATCH_SIZE, QUANTIZE

    p = subparsers.add_parser("build", help="build an engine directory (weights, tokenizer, compiled programs)",
                              description=__doc__)
    p.add_argument("--base", default="default", help="HF checkpoint dir, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--drafter", default="default", help="drafter dir (Apple layout), 'default' (shipped drafter) or 'none'")
    p.add_argument("--output", required=True, help="engine directory to write (replaced atomically if it is an engine)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES))
    p.add_argument("--quantize", default="none", choices=list(QUANTIZE),
                   help="weight-only quantization of the base model's block projections: int8 (per output "
                        "channel; CPU and GPU) or int4 (groups of 32, as llama.cpp's Q4_1; CPU only)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the engine runs (compiled programs are device-specific)")
    p.add_argument("--backend", default="aoti", choices=list(BACKENDS))
    p.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE,
                   help="concurrent requests the engine serves (default %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="longest prompt + completion, in tokens")
    p.add_argument("--plugin-ops", action="store_true",
                   help="aoti: the draft program calls the redrafter::beam_draft op (its Triton kernel on CUDA) "
                        "instead of compiling the beam search")
    p.add_argument("--exact-attention", action="store_true",
                   help="attend in float64, so that a bfloat16 int8/int4 engine's ReDrafter output equals its own "
                        "plain decoding token for token (costs about 20%% of plain speed on the CPU)")
    config.add_arguments(p, plain=False)  # the engine's programs' setting and limits
    p.add_argument("--tactics", action="store_true",
                   help="print the tactic plan the build measured: each linear shape's tactic per row count, "
                        "every candidate's time and why rejected ones were (set REDRAFTER_TACTICS=gate to skip "
                        "timing, or a tactic name to force one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from redrafter.runtime.config import DecodeConfig, from_args

    from .build import BuildOptions, build_engine

    out = build_engine(BuildOptions(
        output=args.output, base=args.base, drafter=args.drafter, dtype=args.dtype, quantize=args.quantize,
        device=args.device, backend=args.backend, decode=from_args(args, DecodeConfig.for_device(args.device)),
        max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, plugin_ops=args.plugin_ops,
        exact_attention=args.exact_attention, progress=not args.no_progress))
    if args.tactics:
        import json

        from redrafter.runtime.tactics import Plan

        recorded = json.loads((out / "config.json").read_text()).get("tactics")
        print(Plan.from_json(recorded).table() if recorded else "no tactic plan: the engine runs on a GPU")
    print(out)
    return 0
