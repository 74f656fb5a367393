"""`redrafter bench`: ReDrafter against plain decoding and peer engines, same prompts, same run.

Plain decoding is the engine's own decoder without a drafter, so the speedup isolates
drafting. Several --engine take turns in one rotation (engines of one base model's tokenizer),
each checked against its own plain decoding; an engine with a step program is also measured
with it ("fused") and with its draft and forward programs ("unfused"). Systems take turns prompt group by prompt group (the order rotates each group),
so load from other processes on a shared machine falls on all of them alike. Every
output of ours must equal plain decoding token for token (greedy; or sampled with the
same per-prompt seed); a mismatch is reported and makes the command exit 1.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path


DATASETS = ("mtbench", "sharegpt")
PEERS = ("hf", "llamacpp")


def _peer_list(text: str) -> list[str]:
    peers = [] if text == "none" else [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown}: choose from {', '.join(PEERS)} or 'none'")
    return peers


def register(subparsers) -> None:
    from redrafter.runtime import config

    p = subparsers.add_parser(
        "bench", help="measure ReDrafter against plain decoding and peers (speed, acceptance, identical outputs)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="append", help="engine directory from `redrafter build` (instead of "
                                                     "--base/--drafter); give several to compare them")
    p.add_argument("--base", help="HF checkpoint dir, .gguf file, or 'default' (SmolLM2-135M-Instruct); "
                                  "with --engine, the model the peers run")
    p.add_argument("--drafter", help="drafter dir, 'default' (our shipped drafter) or 'none' (plain and peers only)")
    p.add_argument("--dataset", default="mtbench", help="mtbench (first turns), sharegpt (held-out), or FILE.jsonl")
    p.add_argument("--questions", type=config.counts(1, many=False), default=10, metavar="N",
                   help="number of prompts (default 10)")
    p.add_argument("--max-new-tokens", type=config.counts(1, many=False), default=128, metavar="N", help="default 128")
    p.add_argument("--batch-sizes", type=config.counts(1), default=[1], metavar="B,...",
                   help="prompts decoded together in lockstep (default 1)")
    # Lists: every combination is measured; with --engine, settings within its built one (default: that one).
    config.add_arguments(p, sweep=True, plain=False)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples through the serving Session, seeded per prompt")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed SEED+i (default 0)")
    p.add_argument("--peers", type=_peer_list, default=list(PEERS), metavar="hf,llamacpp|none",
                   help="peer engines run on the same prompts when installed (default: both)")
    p.add_argument("--threads", type=config.counts(1, many=False), metavar="N",
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
        return datasets.heldout_prompts(n)
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
    from redrafter.builder.engine import built_decode
    from redrafter.runtime.config import DecodeConfig, sweep_from_args

    # Fields not given: an engine's built setting, or the device's default.
    defaults = lambda e: built_decode(e) if e else DecodeConfig.for_device(args.device or "cpu")  # noqa: E731
    targets = [open_target(e, args.base, args.drafter, sweep_from_args(args, defaults(e)), args.batch_sizes,
                           args.device, Path(e).name if len(args.engine or ()) > 1 else "")
               for e in args.engine or [None]]
    target = targets[0]
    prompts = [target.encode_chat(t) for t in texts]
    if any(t.encode_chat(texts[0]) != prompts[0] for t in targets):
        raise ValueError("the engines tokenize prompts differently: compare engines of one base model")
    load_before = report.load_average()
    results, reference = measure(targets, prompts, args.max_new_tokens, args.batch_sizes, args.peers, args.base,
                                 threads, args.temperature, args.seed, notes)
    failures = [(r, m) for r in results for m in (r["mismatches"] or [])]
    mode = "greedy" if args.temperature == 0 else f"sampled (T={args.temperature}, seed {args.seed}+i)"

    settings = {**target.settings, "dataset": args.dataset, "questions": len(prompts),
                "max_new_tokens": args.max_new_tokens, "batch_sizes": args.batch_sizes,
                "configs": [[c.beam_width, c.beam_length, c.lookup_ngram, c.lookup_length, c.tree]
                            for c in target.configs],
                **({"engines": [t.settings for t in targets]} if len(targets) > 1 else {}),
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
        name = f"engine {', '.join(args.engine)}" if args.engine else f"{settings['base']} + drafter {settings['drafter']}"
        report.write_plot(args.plot, results, f"{name}: {len(prompts)} {args.dataset} prompts x {args.max_new_tokens}"
                          f" new tokens, {mode}; {machine['cpu']}, threads={threads}, {machine['date'][:10]}")
    for r, m in failures:
        print(f"redrafter bench: OUTPUT MISMATCH: {r['label']} at batch {r['batch_size']} differs from plain "
              f"{mode} decoding on prompt {m['prompt']} ({texts[m['prompt']][:60]!r}) at generated token "
              f"{m['position']}: expected {m['expected']}, got {m['got']}", file=sys.stderr)
    return 1 if failures else 0


def measure(targets, prompts: list[list[int]], max_new: int, batch_sizes: list[int], peers: list[str],
            base: str | None, threads: int, temperature: float, seed: int,
            notes: list[str]) -> tuple[list[dict], list[list[int]]]:
    """Run every system on every prompt group, taking turns; then `summarize`."""
    from tqdm import tqdm

    from .systems import HFSystem, OursSystem, PeerCrashed, SessionSystem

    def our_systems(t, b: int) -> list:
        made = []
        for name, config, fused in [("plain", None, None)] + [("redrafter", c, f) for c in t.configs for f in t.fused]:
            decoder = t.new_decoder(b, config, max_seq, fused)
            s = (SessionSystem(name, decoder, b, t.eos_ids, temperature) if temperature > 0
                 else OursSystem(name, decoder, b, t.eos_ids))
            s.group, s.variant = t.name, {None: "", True: "fused", False: "unfused"}[fused]
            made.append(s)
        return made

    target = targets[0]

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
    n_systems = {b: sum(1 + len(t.configs) * len(t.fused) for t in targets) + (hf_model is not None)
                 + (llama is not None and b == 1) for b in batch_sizes}
    with tqdm(total=sum(n * -(-len(prompts) // b) for b, n in n_systems.items()), desc="bench", unit="run",
              file=sys.stderr) as bar:
        for b in batch_sizes:
            systems = [s for t in targets for s in our_systems(t, b)]
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
    """One figure dict per (label, batch) of `runs`, with speedups against plain decoding (of the same
    engine; peers: of the first) at the same batch size and output checks against it at the first batch size."""
    from .metrics import agreement, figures, mismatches

    def outputs(key) -> list[list[int]]:
        out: list = [None] * n_prompts
        for idx, r in runs[key]:
            for i, o in zip(idx, r.outputs):
                out[i] = o
        return out

    first = next(s.group for s in systems.values() if s.name == "plain")
    plain_label = lambda group: f"{group} plain".lstrip()  # noqa: E731
    results = []
    for key, system in systems.items():
        label, b = key
        ours = system.name in ("plain", "redrafter")
        group = system.group if ours else first
        reference = outputs((plain_label(group), first_batch))
        fig = figures([r for _, r in runs[key]],
                      (system.step_length - 1) if system.name == "redrafter" else (0 if ours else None))
        plain = figures([r for _, r in runs[(plain_label(group), b)]], 0)
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
        results.append(entry | ({"engine": group} if group else {}))
    return results, outputs((plain_label(first), first_batch))


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
