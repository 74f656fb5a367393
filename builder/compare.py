"""Compare engines in one run: same prompts, each engine's ReDrafter and plain decoding, in turns.

    python -m redrafter.builder.compare ENGINE_DIR... [--questions 5] [--max-new-tokens 128]

Engines and modes take turns prompt by prompt (after one warm-up generation each), so load
drift on a shared machine spreads over all of them. Prints a markdown table; checks that each
engine's ReDrafter output equals its own plain greedy output. Engines with a step program
also run "redrafter-fused" (the step program) and "redrafter-unfused" (draft and forward
programs, host pack/accept/commit); "redrafter" is the engine's default.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engines", nargs="+", type=Path)
    p.add_argument("--questions", type=int, default=5, help="first MT-Bench first turns")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--llamacpp", metavar="GGUF", help="also run llama.cpp on this GGUF ('default': SmolLM2's) "
                   "in the same rotation")
    p.add_argument("--json", dest="json_out", help="write the figures here")
    args = p.parse_args(argv)
    import torch

    from redrafter.builder.engine import load_engine
    from redrafter.datasets import mtbench_first_turns
    from redrafter.runtime.decoding import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = mtbench_first_turns(args.questions)
    systems = []  # (label, run(prompt ids, n) -> Generation, the engine's prompt ids)
    for path in args.engines:
        e = load_engine(path)
        prompts = [e.encode_chat(t) for t in texts]
        modes = [("plain", False, None)] + ([("redrafter", True, None)] if e.drafter is not None else [])
        if e.programs().step is not None:  # the engine's step program vs draft + forward programs
            modes += [("redrafter-fused", True, True), ("redrafter-unfused", True, False)]
        for mode, spec, fused in modes:
            label = f"{path.name} {mode}"
            d = e.decoder(speculative=spec, fused_step=fused)
            run = lambda prompt, n, d=d, eos=e.eos_ids: generate(d, [prompt], n, eos)[0]  # noqa: E731
            run(prompts[0], 16)  # warm-up
            systems.append((label, run, prompts))
    if args.llamacpp:
        from redrafter.bench.systems import PeerCrashed

        try:
            systems.append(("llama.cpp", _llamacpp(args.llamacpp, prompts, e.eos_ids, args.max_new_tokens), prompts))
        except PeerCrashed as err:
            print(f"llama.cpp skipped: {err}", file=sys.stderr)
    from redrafter.bench.systems import PeerCrashed

    runs: dict[str, list] = {s[0]: [] for s in systems}
    for i in range(len(texts)):
        for system in list(systems):
            label, run, prompts = system
            t = time.perf_counter()
            try:
                g = run(prompts[i], args.max_new_tokens)
            except PeerCrashed as e:  # reported; the other systems go on
                print(f"{label} left the comparison: {e}", file=sys.stderr)
                systems.remove(system)
                del runs[label]
                continue
            runs[label].append((g, time.perf_counter() - t))
    rows, ok = [], True
    for label, _, _ in systems:
        gens = runs[label]
        tokens = sum(len(g.token_ids) for g, _ in gens)
        seconds = sum(s for _, s in gens)
        steps = sum(g.steps for g, _ in gens)
        rows.append({"system": label, "tokens": tokens, "seconds": round(seconds, 2),
                     "tok_per_s": round(tokens / seconds, 2),
                     "median_tok_per_s": round(statistics.median(len(g.token_ids) / s for g, s in gens), 2),
                     "tokens_per_step": round((tokens - len(gens)) / max(steps, 1), 3),
                     "ttft_ms": round(statistics.median(g.prefill_s for g, _ in gens) * 1e3, 1)})
        plain = f"{label.rsplit(' ', 1)[0]} plain"
        if " redrafter" in label:
            same = sum(g.token_ids == p.token_ids for (g, _), (p, _) in zip(gens, runs[plain]))
            rows[-1]["equals_plain"] = same == len(gens)
            rows[-1]["prompts_equal_to_plain"] = same
            ok &= same == len(gens)
    print("| system | tok/s (total) | median tok/s | tokens/step | TTFT ms (median) | output = plain |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        equal = f"{r['prompts_equal_to_plain']}/{len(texts)}" if "equals_plain" in r else ""
        print(f"| {r['system']} | {r['tok_per_s']} | {r['median_tok_per_s']} | {r['tokens_per_step']} | {r['ttft_ms']} "
              f"| {equal} |")
    print(f"{len(texts)} MT-Bench prompts x {args.max_new_tokens} new tokens, batch 1, "
          f"{torch.get_num_threads()} threads")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    if not ok:
        print("MISMATCH: ReDrafter output differs from plain greedy on the same engine", file=sys.stderr)
    return 0 if ok else 1


def _llamacpp(gguf: str, prompts: list[list[int]], eos_ids: list[int], max_new_tokens: int):
    """llama.cpp as a run(prompt ids, n) -> Generation, on the engines' token ids, with
    torch's thread count."""
    import torch

    from redrafter.bench.systems import LlamaCppSystem
    from redrafter.runtime.decoding import Generation
    from redrafter.runtime.loading import default_gguf

    path = default_gguf() if gguf == "default" else Path(gguf)
    longest = max(len(p) for p in prompts)
    llm = LlamaCppSystem(path, longest + max_new_tokens + 8, torch.get_num_threads(), eos_ids, 0.0)

    def run(prompt: list[int], n: int) -> Generation:
        r = llm([prompt], n, [0])
        return Generation(r.outputs[0], len(r.outputs[0]) - 1, r.first_token_s[0], r.seconds)

    run(prompts[0], 16)  # warm-up
    return run


if __name__ == "__main__":
    sys.exit(main())
