"""Throughput of the serving Session by batch size: plain decoding vs ReDrafter with fixed
beam shapes vs the adaptive (measured) beam policy over those shapes, in the same run.

Systems take turns at every batch size (the order rotates each repeat), so load from other
processes on a shared machine falls on all of them alike. Greedy decoding: every ReDrafter
output must equal plain decoding token for token, else the script exits 1.

    python examples/adaptive_beam.py --batches 1,2,4,8,16 --fixed 1x2,4x4 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="default")
    p.add_argument("--drafter", default="default", help="drafter dir or 'default' (the shipped drafter)")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--fixed", default="4x4", help="fixed beam shapes to compare, WxL[,WxL...]")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from redrafter.datasets import mtbench_first_turns
    from redrafter.runtime.config import DecodeConfig
    from redrafter.runtime.decoding import Decoder
    from redrafter.runtime.pipeline import load
    from redrafter.runtime.scheduler import MeasuredBeamPolicy
    from redrafter.runtime.session import SamplingParams, Session

    batches = [int(b) for b in args.batches.split(",")]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.fixed.split(",")]
    loaded = load(args.base, args.drafter)
    prompts = [loaded.encode_chat(q) for q in mtbench_first_turns(max(batches))]
    max_seq = max(len(p) for p in prompts) + args.max_new_tokens
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    print(f"# threads={torch.get_num_threads()} load={os.getloadavg()}", flush=True)
    results, failed = [], False
    # One adaptive policy for all batch sizes, as in a serving session (it learns each batch
    # size online, separately).
    adaptive = MeasuredBeamPolicy(((1, 1), *shapes))
    cap_w, cap_l = adaptive.largest_shape
    for b in batches:
        sessions = {"plain": Session(Decoder(loaded.model, None, max_batch=b, max_seq_len=max_seq))}
        for sw, sl in shapes:
            sessions[f"fixed {sw}x{sl}"] = Session(Decoder(loaded.model, loaded.drafter, DecodeConfig(sw, sl),
                                                           max_batch=b, max_seq_len=max_seq))
        sessions["adaptive"] = Session(Decoder(loaded.model, loaded.drafter, DecodeConfig(cap_w, cap_l), max_batch=b,
                                               max_seq_len=max_seq), beam_policy=adaptive)
        names = list(sessions)
        totals = {n: [0, 0.0] for n in names}
        outputs: dict[str, list[list[int]]] = {}
        for s in sessions.values():  # warm-up
            s.generate(prompts[:1], SamplingParams(max_new_tokens=2))
        for rep in range(args.repeats):
            for n in names[rep % len(names):] + names[:rep % len(names)]:
                t0 = time.perf_counter()
                outs = sessions[n].generate(prompts[:b], params)
                totals[n][1] += time.perf_counter() - t0
                totals[n][0] += sum(len(o.token_ids) for o in outs)
                outputs[n] = [o.token_ids for o in outs]
        for n in names:
            m = sessions[n].metrics()
            row = {"batch": b, "system": n, "tok_per_s": totals[n][0] / totals[n][1],
                   "tokens_per_step": m["tokens_per_step"], "beam_shapes": m["beam_shapes"],
                   "identical_to_plain": outputs[n] == outputs["plain"]}
            failed |= not row["identical_to_plain"]
            results.append(row)
            print(json.dumps(row), flush=True)
            sessions[n].close()
    plain = {r["batch"]: r["tok_per_s"] for r in results if r["system"] == "plain"}
    print(f"\n| batch | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for b in batches:
        cells = [f"{r['tok_per_s']:.1f} tok/s ({r['tok_per_s'] / plain[b]:.2f}x, {r['tokens_per_step']:.2f} tok/step)"
                 for r in results if r["batch"] == b]
        print(f"| {b} | " + " | ".join(cells) + " |")
    print(f"# load={os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
