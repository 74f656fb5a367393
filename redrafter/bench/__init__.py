"""`redrafter bench`: ReDrafter against plain decoding and peer engines, same prompts, same run.

Plain decoding is the engine's own decoder without a drafter, so the speedup isolates
drafting. Systems take turns prompt group by prompt group (the order rotates each group),
so load from other processes on a shared machine falls on all of them alike. Every
output of ours must equal plain decoding token for token (greedy; or sampled with the
same per-prompt seed); a mismatch is reported and makes the command exit 1.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from ..cli import positive_int

DATASETS = ("mtbench", "sharegpt")
PEERS = ("hf", "llamacpp")


def _int_list(what: str, minimum: int):
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers for {what}, got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be >= {minimum}, got {text!r}")
        return sorted(set(values))
    return parse


def _peer_list(text: str) -> list[str]:
    peers = [] if text == "none" else [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown}: choose from {', '.join(PEERS)} or 'none'")
    return peers


def _tree_list(text: str) -> list[str]:
    from redrafter.runtime.decoding import TREES

    trees = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not trees or set(trees) - set(TREES):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(TREES)}, got {text!r}")
    return trees


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="measure ReDrafter against plain decoding and peers (speed, acceptance, identical outputs)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", help="engine directory from `redrafter build` (instead of --base/--drafter)")
    p.add_argument("--base", help="HF checkpoint dir, .gguf file, or 'default' (SmolLM2-135M-Instruct); "
                                  "with --engine, the model the peers run")
    p.add_argument("--drafter", help="drafter dir, 'default' (our shipped drafter) or 'none' (plain and peers only)")
    p.add_argument("--dataset", default="mtbench", help="mtbench (first turns), sharegpt (held-out), or FILE.jsonl")
    p.add_argument("--questions", type=positive_int, default=10, metavar="N",
                   help="number of prompts (default 10)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N", help="default 128")
    p.add_argument("--batch-sizes", type=_int_list("batch sizes", 1), default=[1], metavar="B,...",
                   help="prompts decoded together in lockstep (default 1)")
    p.add_argument("--beam-width", type=_int_list("beam width W", 1), metavar="W,...", help="default 4")
    p.add_argument("--beam-length", type=_int_list("beam length L (it counts the guaranteed token)", 2),
                   metavar="L,...", help="default 4; every (W, L) pair of the two lists is measured")
    p.add_argument("--lookup", type=_int_list("lookup n-gram", 0), default=[0], metavar="N,...",
                   help="context lookup: add a beam copying what followed the last 1..N tokens earlier in the "
                        "sequence (0 = off, the default); every (W, L) pair is measured with each N")
    p.add_argument("--lookup-length", type=positive_int, default=None, metavar="K",
                   help="with --lookup: the lookup beam's tokens if more than L (default: L)")
    p.add_argument("--tree", type=_tree_list, default=None, metavar="beams,search",
                   help="what a step verifies: the W final beams (beams, the default) or every prefix the beam "
                        "search kept (search: 1 + W(L-1) tokens); each is measured")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples through the serving Session, seeded per prompt")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed SEED+i (default 0)")
    p.add_argument("--peers", type=_peer_list, default=list(PEERS), metavar="hf,llamacpp|none",
                   help="peer engines run on the same prompts when installed (default: both)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for torch and llama.cpp alike (default: torch's default)")
    p.add_argument("--device", help="torch device for our runtime and HF (default cpu, or the engine's)")
    p.add_argument("--json", dest="json_out", metavar="OUT.json", help="write every figure and machine info here")
    p.add_argument("--plot", metavar="OUT.png",
                   help="write a plot (tok/s by system and batch size; tokens per step by W, L)")
    p.set_defaults(func=run)


def load_prompts(dataset: str, n: int) -> list[str]:
    from pathlib import Path

    from redrafter import datasets

    if dataset == "mtbench":
        return datasets.mtbench_first_turns(n)
    if dataset == "sharegpt":
        from redrafter.training.data import heldout_prompts

        return heldout_prompts(n)
    if dataset.endswith(".jsonl") or Path(dataset).exists():
        return datasets.jsonl_prompts(dataset, n)
    raise ValueError(f"unknown dataset {dataset!r}: use {', '.join(DATASETS)} or a path to a .jsonl file")


def run(args: argparse.Namespace) -> int:
    import torch

    from . import report
    from .target import open_target

    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    texts = load_prompts(args.dataset, args.questions)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    notes: list[str] = []
    if len(texts) < args.questions:
        notes.append(f"{args.dataset} has {len(texts)} prompts; --questions {args.questions} asked for more")
    target = open_target(args.engine, args.base, args.drafter, args.beam_width, args.beam_length, args.lookup,
                         args.lookup_length or 0, args.batch_sizes, args.device, args.tree)
    prompts = [target.encode_chat(t) for t in texts]
    load_before = report.load_average()
    results, reference = measure(target, prompts, args.max_new_tokens, args.batch_sizes, args.peers, args.base,
                                 threads, args.temperature, args.seed, notes)
    failures = [(r, m) for r in results for m in (r["mismatches"] or [])]
    mode = "greedy" if args.temperature == 0 else f"sampled (T={args.temperature}, seed {args.seed}+i)"

    settings = {**target.settings, "dataset": args.dataset, "questions": len(prompts),
                "max_new_tokens": args.max_new_tokens, "batch_sizes": args.batch_sizes, "configs": target.configs,
                "temperature": args.temperature, "seed": args.seed, "peers": args.peers, "threads": threads,
                "reference": f"our plain {mode} decoding at batch {args.batch_sizes[0]}"}
    machine = report.machine_info(threads) | {"load_average_before": load_before}
    out = {"schema": "redrafter-bench/1", "machine": machine, "settings": settings,
           "prompts": [{"index": i, "prompt_tokens": len(p), "text": t[:120], "output_ids": o}
                       for i, (p, t, o) in enumerate(zip(prompts, texts, reference))],
           "results": results, "identical": not failures, "notes": notes}
    print(report.table(results))
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {threads} threads, torch {machine['torch']}, "
          f"load average {load_before} before, {machine['load_average']} after")
    for n in notes:
        print(f"note: {n}")
    if args.json_out:
        report.write_json(args.json_out, out)
    if args.plot:
        name = f"engine {args.engine}" if args.engine else f"{settings['base']} + drafter {settings['drafter']}"
        report.write_plot(args.plot, results, f"{name}: {len(prompts)} {args.dataset} prompts x {args.max_new_tokens}"
                          f" new tokens, {mode}; {machine['cpu']}, threads={threads}, {machine['date'][:10]}")
    for r, m in failures:
        print(f"redrafter bench: OUTPUT MISMATCH: {r['label']} at batch {r['batch_size']} differs from plain "
              f"{mode} decoding on prompt {m['prompt']} ({texts[m['prompt']][:60]!r}) at generated token "
              f"{m['position']}: expected {m['expected']}, got {m['got']}", file=sys.stderr)
    return 1 if failures else 0


def measure(target, prompts: list[list[int]], max_new: int, batch_sizes: list[int], peers: list[str],
            base: str | None, threads: int, temperature: float, seed: int,
            notes: list[str]) -> tuple[list[dict], list[list[int]]]:
    """Run every system on every prompt group, taking turns; then `summarize`."""
    from tqdm import tqdm

    from .systems import HFSystem, OursSystem, PeerCrashed, SessionSystem

    def our_system(name: str, decoder, b: int):
        if temperature > 0:
            return SessionSystem(name, decoder, b, target.eos_ids, temperature)
        return OursSystem(name, decoder, b, target.eos_ids)

    max_seq = max(len(p) for p in prompts) + max_new
    hf_model = HFSystem.load(target.hf_dir, target.device) if "hf" in peers else None
    llama = None
    if "llamacpp" in peers:
        llama, why = _llamacpp(base, max_seq, threads, target.eos_ids, temperature)
        if why:
            notes.append(why)
        elif 1 not in batch_sizes:
            llama = None
            notes.append("llama.cpp is measured at batch 1 only: add 1 to --batch-sizes")
    running = [what for what, on in (("transformers on its fp32 HF checkpoint", hf_model),
                                      ("llama.cpp on its GGUF file", llama)) if on is not None]
    if running:
        notes.append(f"peers run the base model {base or 'default'}: {' and '.join(running)}")
        if temperature > 0:
            notes.append("peers sample from their own random streams: their agreement with ours is not expected")
    pad = target.tokenizer.pad_token_id
    pad = target.eos_ids[0] if pad is None else pad

    runs: dict[tuple[str, int], list] = defaultdict(list)  # (label, batch) -> [(prompt indices, Run)]
    systems_by_key = {}
    n_systems = {b: 1 + len(target.configs) + (hf_model is not None) + (llama is not None and b == 1)
                 for b in batch_sizes}
    with tqdm(total=sum(n * -(-len(prompts) // b) for b, n in n_systems.items()), desc="bench", unit="run",
              file=sys.stderr) as bar:
        for b in batch_sizes:
            systems = [our_system("plain", target.new_decoder(b, None, max_seq), b)]
            systems += [our_system("redrafter", target.new_decoder(b, config, max_seq), b) for config in target.configs]
            if hf_model is not None:
                systems.append(HFSystem(hf_model, b, target.eos_ids, pad, temperature))
            if llama is not None and b == 1:
                systems.append(llama)
            groups = [list(range(i, min(i + b, len(prompts)))) for i in range(0, len(prompts), b)]
            def crashed(s, e: PeerCrashed) -> None:
                """A peer whose process died leaves the benchmark, which goes on without it."""
                notes.append(f"{s.label} left the benchmark: {e}")
                systems.remove(s)
                runs.pop((s.label, b), None)
                systems_by_key.pop((s.label, b), None)

            for s in list(systems):  # warm-up (untimed): first-call allocations and kernel selection
                try:
                    s([prompts[i] for i in groups[0]], min(4, max_new), [seed + i for i in groups[0]])
                except PeerCrashed as e:
                    crashed(s, e)
            for g, idx in enumerate(groups):
                k = g % len(systems)  # rotate who goes first each group
                for s in systems[k:] + systems[:k]:
                    bar.set_postfix_str(f"{s.label} B={b}", refresh=False)
                    try:
                        run = s([prompts[i] for i in idx], max_new, [seed + i for i in idx])
                    except PeerCrashed as e:
                        crashed(s, e)
                        continue
                    runs[(s.label, b)].append((idx, run))
                    systems_by_key[(s.label, b)] = s
                    bar.update()
            for s in systems:
                s.close()
    return summarize(runs, systems_by_key, len(prompts), batch_sizes[0])


def summarize(runs: dict, systems: dict, n_prompts: int, first_batch: int) -> tuple[list[dict], list[list[int]]]:
    """One figure dict per (label, batch) of `runs`, with speedups against plain decoding at the
    same batch size and output checks against plain decoding at the first batch size."""
    from .metrics import agreement, figures, mismatches

    def outputs(key) -> list[list[int]]:
        out: list = [None] * n_prompts
        for idx, r in runs[key]:
            for i, o in zip(idx, r.outputs):
                out[i] = o
        return out

    reference = outputs(("plain", first_batch))
    results = []
    for key, system in systems.items():
        label, b = key
        ours = system.name in ("plain", "redrafter")
        fig = figures([r for _, r in runs[key]],
                      (system.step_length - 1) if system.name == "redrafter" else (0 if ours else None))
        plain = figures([r for _, r in runs[("plain", b)]], 0)
        entry = {"system": system.name, "label": label, "batch_size": b, "beam_width": system.beam_width,
                 "beam_length": system.beam_length, "lookup_ngram": system.lookup_ngram,
                 "step_length": system.step_length, "tree": system.tree, **fig,
                 "speedup": fig["tok_per_s"] / plain["tok_per_s"],
                 "decode_speedup": (fig["decode_tok_per_s"] / plain["decode_tok_per_s"]
                                    if fig["decode_tok_per_s"] and plain["decode_tok_per_s"] else None),
                 "identical": None, "mismatches": None, "agreement": None}
        if ours:
            bad = [m.as_dict() for m in mismatches(reference, outputs(key))]
            entry["identical"], entry["mismatches"] = not bad, bad
        else:
            entry["agreement"] = agreement(reference, outputs(key))
        results.append(entry)
    return results, reference


def _llamacpp(base: str | None, n_ctx: int, threads: int, eos: list[int], temperature: float):
    """(LlamaCppSystem | None, note): llama.cpp needs the GGUF file, so only GGUF bases have it."""
    import importlib.util
    from pathlib import Path

    from redrafter.runtime.loading import default_gguf

    from .systems import LLAMACPP_BUILD, LlamaCppSystem, PeerCrashed

    if importlib.util.find_spec("llama_cpp") is None:
        return None, f"llama.cpp peer skipped: llama-cpp-python is not installed ({LLAMACPP_BUILD})"
    if base is None or base == "default":
        gguf = default_gguf()
    elif str(base).endswith(".gguf"):
        gguf = Path(base)
    else:
        return None, f"llama.cpp peer skipped: base {base!r} is an HF directory, not a GGUF file"
    try:
        return LlamaCppSystem(gguf, n_ctx + 8, threads, eos, temperature), None
    except PeerCrashed as e:
        return None, f"llama.cpp peer skipped: {e}"
