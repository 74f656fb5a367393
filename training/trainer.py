"""Training a draft head on a cached teacher: the objective, the loop, checkpoints and resume.

Alignment with inference. At inference the head gets h = the base hidden state at position
n-1 (whose logits gave the guaranteed token x_n) and x_n as its first input, and drafts
x_{n+1}, x_{n+2}, ... (step k reads the token drafted at step k-1). For a training sequence y
with teacher hidden states H_t and teacher argmax a_t (the base model's prediction of
position t+1 given y_0..y_t), a sample at position t is:

  context H_t; step-k input y_{t+k}; step-k label
    distill:      a_{t+k}   (the base model's greedy next token given y_0..y_{t+k})
    kl:           the base model's whole next-token distribution given y_0..y_{t+k}
                  (softmax of its LM head on H_{t+k}, over the draft vocabulary)
    ground-truth: y_{t+k+1}

Inputs are the ground-truth tokens and, in distill and kl modes, every label is the
teacher's prediction given exactly the prefix the head has seen (the paper's local
distillation), so each step is self-consistent even where the text departs from what the
base model would write. kl trains on the soft distribution (cross-entropy to it, i.e. forward
KL up to a constant): each position then says how sure the teacher is and what it would rank
second, more signal per cached position where data is what limits the head. The soft targets
are recomputed from the cached hidden states on the fly, so the cache stays the same.

A step counts only when the token it predicts is an assistant token of the same sequence
(and all earlier steps count).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from redrafter.runtime.atomic import atomic_dir, atomic_file
from redrafter.runtime.drafter import DraftHead, DrafterConfig, check_compatible, load_drafter, save_drafter

LABELS = ("distill", "kl", "ground-truth")
CHECKPOINT = "checkpoint"


@dataclass
class TrainConfig:
    output: str
    base: str = "default"
    data: str | list[str] = "sharegpt"  # one source, or several whose train splits are concatenated
    max_samples: int | None = None   # training conversations (after the held-out split)
    seq_len: int = 512               # tokens kept per conversation
    epochs: float = 1.0              # passes over the trainable positions (fractions allowed)
    lr: float = 1e-3
    batch_size: int = 256            # positions per optimizer step
    draft_len: int = 4               # drafted tokens per position (beam length L = draft_len + 1)
    head: str = "shared"
    draft_vocab: int = 0             # 0: draft over the whole vocabulary; N: over the N most frequent labels
    labels: str = "distill"
    num_draft_layers: int = 2
    warmup: float = 0.05             # fraction of the steps
    weight_decay: float = 0.0
    seed: int = 0
    eval_samples: int = 32           # held-out conversations for the final metrics
    checkpoint_every: int = 50       # optimizer steps
    cache_dir: str | None = None     # teacher cache; default: under ~/.cache/redrafter/teacher
    teacher_workers: int = 1
    bf16: bool = False               # bfloat16 autocast for the head (about 2x faster on CPUs with bf16)
    device: str = "cpu"              # where the teacher pass and the head run (cpu, cuda, cuda:N)
    save_dtype: str = "float32"      # storage dtype of the final weights (float32|float16|bfloat16)
    resume: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.head not in ("own", "shared"):
            raise ValueError(f"--head must be 'own' or 'shared', got {self.head!r}")
        if self.labels not in LABELS:
            raise ValueError(f"--labels must be one of {LABELS}, got {self.labels!r}")
        for name in ("seq_len", "batch_size", "draft_len", "checkpoint_every", "teacher_workers", "eval_samples"):
            if getattr(self, name) < (0 if name == "eval_samples" else 1):
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.seq_len < self.draft_len + 2:
            raise ValueError(f"--seq-len {self.seq_len} is too short for --draft-len {self.draft_len}")
        if self.num_draft_layers < 0 or self.weight_decay < 0:
            raise ValueError(f"--draft-layers and --weight-decay must be >= 0, got {self.num_draft_layers} and "
                             f"{self.weight_decay}")
        if self.draft_vocab < 0:
            raise ValueError(f"--draft-vocab must be >= 0 (0: the whole vocabulary), got {self.draft_vocab}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {self.max_samples}")
        if not (self.epochs > 0 and self.lr > 0):
            raise ValueError("--epochs and --lr must be > 0")
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"save dtype must be float32, float16 or bfloat16, got {self.save_dtype!r}")
        if not self.sources():
            raise ValueError("--data needs at least one source ('sharegpt', a JSONL file or a .npz file)")
        check_device(self.device)

    def sources(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)

    def run_key(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        d = asdict(self)
        for k in ("resume", "progress", "cache_dir", "teacher_workers", "checkpoint_every", "output", "device"):
            d.pop(k)
        return d


def check_device(device: str) -> None:
    """Where training and self-data run: the CPU, or a CUDA GPU that this torch build sees."""
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build sees no CUDA GPU; run with --device cpu")


@dataclass
class Batch:
    context: Tensor  # [B, H] teacher hidden state at position t
    inputs: Tensor   # [B, K] token fed at step k (y_{t+k})
    labels: Tensor   # [B, K]
    valid: Tensor    # [B, K] bool
    teacher: Tensor | None = None  # [B, K, H] teacher hidden state behind each step's label (kl)


class Positions:
    """The trainable positions of a teacher cache and the batches drawn from them.

    The hidden states are read as a torch view of the memory-mapped cache on the CPU, and are
    copied whole to an accelerator (float16, 1.1 kB per token at SmolLM2's size), where the
    batches are then gathered."""

    def __init__(self, cache, draft_len: int, labels: str, device: torch.device = torch.device("cpu")):
        n, k = len(cache), draft_len
        self.cache, self.k = cache, k
        self.hidden = torch.from_numpy(cache.hidden).to(device)  # [N, H] float16
        self._order: tuple[int, np.ndarray] | None = None
        tokens = np.concatenate([cache.tokens, np.zeros(k + 1, np.int32)])
        assistant = np.concatenate([cache.assistant, np.zeros(k + 1, bool)])
        t = np.arange(n)
        steps = np.arange(1, k + 1)
        target = t[:, None] + steps[None, :] + 1  # position predicted at step k
        valid = (target < cache.ends[:, None]) & assistant[target]
        self.valid = np.cumprod(valid, axis=1).astype(bool)  # [N, K]
        self.inputs = tokens[t[:, None] + steps[None, :]]
        teacher_labels = labels != "ground-truth"
        source = np.concatenate([cache.argmax, np.zeros(k + 1, np.int32)]) if teacher_labels else tokens
        self.labels = source[t[:, None] + steps[None, :] + (0 if teacher_labels else 1)]
        # kl: the position whose hidden state gives step k's soft label (clipped where the step is invalid)
        self.soft = np.minimum(t[:, None] + steps[None, :], n - 1) if labels == "kl" else None
        self.index = np.flatnonzero(self.valid[:, 0])

    def __len__(self) -> int:
        return len(self.index)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's seeded permutation of the positions (kept: every step of the epoch reads it)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([seed, epoch]).permutation(self.index))
        return self._order[1]

    def _hidden(self, idx: np.ndarray, device: torch.device) -> Tensor:
        return self.hidden[torch.from_numpy(idx).to(self.hidden.device)].to(device, torch.float32)

    def batch(self, idx: np.ndarray, device: torch.device) -> Batch:
        idx = np.sort(idx)  # sequential reads from the memory-mapped hidden states
        teacher = None
        if self.soft is not None:
            at = self.soft[idx]  # [B, K]
            teacher = self._hidden(at.reshape(-1), device).view(*at.shape, -1)
        return Batch(
            context=self._hidden(idx, device),
            inputs=torch.from_numpy(self.inputs[idx].astype(np.int64)).to(device),
            labels=torch.from_numpy(self.labels[idx].astype(np.int64)).to(device),
            valid=torch.from_numpy(self.valid[idx]).to(device),
            teacher=teacher,
        )


def choose_draft_vocab(positions: Positions, size: int, vocab_size: int) -> Tensor:
    """The `size` most frequent training labels (ties: lower id), as increasing ids: the tokens
    a small draft vocabulary loses are the ones the head would rarely predict anyway."""
    counts = np.bincount(positions.labels[positions.valid], minlength=vocab_size)
    top = np.lexsort((np.arange(vocab_size), -counts))[:size]
    return torch.from_numpy(np.sort(top)).long()


def label_rows(head: DraftHead) -> Tensor:
    """Vocabulary id -> output row of the head (-100, ignored by the loss, outside its draft
    vocabulary; the identity without one)."""
    device = next(head.parameters()).device
    vocab = head.draft_vocab if head.draft_vocab is not None else torch.arange(head.cfg.vocab_size, device=device)
    rows = torch.full((head.cfg.vocab_size,), -100, dtype=torch.long, device=device)
    rows[vocab] = torch.arange(len(vocab), device=device)
    return rows


def draft_logits(head: DraftHead, embed: Tensor, lm_head: Tensor | None, context: Tensor, inputs: Tensor) -> Tensor:
    """Teacher-forced draft logits [B, K, V]: the recurrence over the inputs, then one head call."""
    state = context.new_zeros(context.shape)
    states = []
    for k in range(inputs.shape[1]):
        state = head.step(state, embed[inputs[:, k]])
        states.append(state)
    return head.logits(context[:, None, :], torch.stack(states, dim=1), lm_head)


def step_losses(logits: Tensor, batch: Batch, rows: Tensor,
                soft: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step mean cross-entropy [K], per-step top-1 accuracy [K] (against batch.labels) and
    counts [K].

    rows: label_rows(head); a hard label outside a draft vocabulary is a sure miss and gives no
    gradient. soft [B, K, V]: teacher logits over the head's rows; the loss is then the
    cross-entropy to their softmax."""
    b, k, v = logits.shape
    target = rows[batch.labels]
    w = batch.valid.float()
    if soft is None:
        ce = F.cross_entropy(logits.reshape(b * k, v), target.reshape(-1), reduction="none", ignore_index=-100)
        w_loss = w * (target != -100).float()
    else:
        ce = F.cross_entropy(logits.reshape(b * k, v), soft.softmax(-1).reshape(b * k, v), reduction="none")
        w_loss = w
    loss = (ce.view(b, k) * w_loss).sum(0) / w_loss.sum(0).clamp(min=1)
    count = w.sum(0)
    correct = ((logits.argmax(-1) == target).float() * w).sum(0)
    return loss, correct / count.clamp(min=1), count


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _check_output(cfg: TrainConfig) -> Path:
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {str(out)!r} is a file: give a directory")
    ckpt = out / CHECKPOINT
    if cfg.resume:
        if not (ckpt / "trainer_state.json").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {str(out)!r} (start without --resume)")
    elif out.is_dir() and any(not p.name.startswith(f".{CHECKPOINT}.tmp-") for p in out.iterdir()):
        # (a first checkpoint's write killed half-way leaves only its temporary directory, which
        # the next checkpoint's atomic_dir removes: that run starts afresh)
        raise ValueError(f"--output {str(out)!r} is not empty: pass --resume to continue its training, "
                         "or choose a new directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --output {str(out)!r}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--output {str(out)!r} is not writable")
    return out


# The training conversations are cached in shards of this many (in seeded order), so a run with
# a larger --max-samples computes the teacher only for the conversations it adds.
SHARD_CONVERSATIONS = 4000


def prepare_data(cfg: TrainConfig, tokenizer) -> tuple[list[list], list]:
    """Tokenized training sequences in shards of SHARD_CONVERSATIONS conversations, and the
    held-out sequences: from text (tokenized here) or from a `redrafter tokenize` file.

    Several sources (e.g. ShareGPT and the base model's own answers) are split each with the
    run's seed, --max-samples and --eval-samples applying to each, and sharded each, so a
    source's teacher cache is the same whether it is trained alone or with others."""
    from redrafter.datasets import is_tokenized

    from .data import load_tokenized, tokenized_split

    def trainable(seqs: list) -> list:
        return [s for s in seqs if s.assistant.any()]

    shards, held = [], []
    for source in cfg.sources():
        if is_tokenized(source):
            train_seqs, held_seqs = load_tokenized(source, tokenizer, cfg.seq_len, cfg.seed)
            train_seqs, held_seqs = train_seqs[: cfg.max_samples], held_seqs[: cfg.eval_samples]
        else:
            train_seqs, held_seqs = tokenized_split(tokenizer, source, cfg.seq_len, cfg.seed, cfg.max_samples,
                                                    cfg.eval_samples)
        shards += [trainable(train_seqs[i:i + SHARD_CONVERSATIONS])
                   for i in range(0, len(train_seqs), SHARD_CONVERSATIONS)]
        held += trainable(held_seqs)
    shards = [s for s in shards if s]
    if not shards:
        raise ValueError(f"no trainable tokens in {' + '.join(cfg.sources())}: every conversation lost its "
                         f"assistant turns within --seq-len {cfg.seq_len}")
    return shards, held


def train(cfg: TrainConfig, stop_after: int | None = None) -> Path:
    """Train a draft head; returns the output directory.

    stop_after: stop (after checkpointing) once this many optimizer steps have run in this
    call, as an interruption would; `resume=True` continues the same run exactly.
    """
    from tqdm import tqdm

    from redrafter.runtime.loading import load_base, load_tokenizer

    from .teacher import build_teacher_cache

    cfg.validate()
    out = _check_output(cfg)
    t_start = time.time()
    model, base_dir = load_base(cfg.base, device=cfg.device)
    tokenizer = load_tokenizer(base_dir)
    if len(tokenizer) > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the base model's vocabulary is "
                         f"{model.cfg.vocab_size}: tokenizer and model do not belong together")
    embed = model.embed.weight.detach()
    lm_head = model.lm_head.weight.detach() if cfg.head == "shared" else None
    teacher_lm_head = model.lm_head.weight.detach()
    del model.layers  # only the embedding and LM head are needed to train the head

    shards, held_seqs = prepare_data(cfg, tokenizer)
    from .teacher import concat_caches, fingerprint

    root = Path(cfg.cache_dir) if cfg.cache_dir else _default_cache_root()
    train_cache = concat_caches([build_teacher_cache(base_dir, seqs, root / fingerprint(base_dir, seqs),
                                                     cfg.teacher_workers, cfg.progress, cfg.device)
                                 for seqs in shards])
    held_cache = (build_teacher_cache(base_dir, held_seqs, root / fingerprint(base_dir, held_seqs),
                                      cfg.teacher_workers, cfg.progress, cfg.device) if held_seqs else None)
    t_teacher = time.time() - t_start
    positions = Positions(train_cache, cfg.draft_len, cfg.labels, embed.device)
    if len(positions) == 0:
        raise ValueError("no trainable positions: the assistant turns are shorter than two tokens")
    steps_per_epoch = math.ceil(len(positions) / cfg.batch_size)
    total = max(1, math.ceil(cfg.epochs * len(positions) / cfg.batch_size))
    warmup = max(1, int(cfg.warmup * total))

    torch.manual_seed(cfg.seed)
    device = embed.device
    vocab = choose_draft_vocab(positions, cfg.draft_vocab, embed.shape[0]) if cfg.draft_vocab else None
    head = DraftHead(DrafterConfig.for_base(embed.shape[0], embed.shape[1], cfg.head, cfg.num_draft_layers,
                                            draft_vocab_size=cfg.draft_vocab), vocab)
    head.to(device).train()
    check_compatible(head.cfg, embed.shape[0], embed.shape[1])
    out_weight = head.output_weight(lm_head) if lm_head is not None else None
    teacher_weight = head.output_weight(teacher_lm_head) if cfg.labels == "kl" else None  # [V_draft, H]
    rows = label_rows(head)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    state = {"step": 0, "history": [], "train_seconds": 0.0, "teacher_seconds": t_teacher}
    if cfg.resume:
        state = _load_checkpoint(out / CHECKPOINT, cfg, head, opt, sched)
        state["teacher_seconds"] = state.get("teacher_seconds", 0.0) + t_teacher

    bar = tqdm(total=total, initial=state["step"], desc="train", unit="step", disable=not cfg.progress,
               mininterval=2)
    ran = 0
    t_seg = time.time()
    while state["step"] < total and (stop_after is None or ran < stop_after):
        step = state["step"]
        epoch, i = divmod(step, steps_per_epoch)
        idx = positions.order(cfg.seed, epoch)[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        batch = positions.batch(idx, device)
        soft = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = draft_logits(head, embed, out_weight, batch.context, batch.inputs)
            if teacher_weight is not None:
                with torch.no_grad():
                    soft = (batch.teacher @ teacher_weight.T).float()  # [B, K, V_draft]
        loss_k, acc_k, _ = step_losses(logits.float(), batch, rows, soft)
        loss = loss_k.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        state["step"] = step + 1
        ran += 1
        record = {"step": step + 1, "loss": round(loss.item(), 4), "acc": [round(a, 4) for a in acc_k.tolist()],
                  "lr": sched.get_last_lr()[0]}
        state["history"].append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc="/".join(f"{a:.2f}" for a in record["acc"]))
        bar.update(1)
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] == total:
            state["train_seconds"] += time.time() - t_seg
            t_seg = time.time()
            _save_checkpoint(out / CHECKPOINT, cfg, head, opt, sched, state)
    bar.close()
    if state["step"] % cfg.checkpoint_every and state["step"] != total:
        state["train_seconds"] += time.time() - t_seg
        _save_checkpoint(out / CHECKPOINT, cfg, head, opt, sched, state)
    if state["step"] < total:
        return out
    metrics = {
        "steps": total, "positions": len(positions), "epochs": cfg.epochs,
        "train_sequences": sum(map(len, shards)), "train_tokens": len(train_cache),
        "train_assistant_tokens": int(train_cache.assistant.sum()),
        "teacher_seconds": round(state["teacher_seconds"], 1), "train_seconds": round(state["train_seconds"], 1),
        "torch_threads": torch.get_num_threads(),
        "final_train": _mean_recent(state["history"]),
        "draft_vocab": cfg.draft_vocab or embed.shape[0],
        "draft_vocab_label_coverage": _coverage(head, positions),
        "heldout": evaluate(head, embed, out_weight, held_cache, cfg) if held_cache is not None else None,
    }
    export(head, out, cfg, metrics, state["history"])
    return out


def evaluate(head: DraftHead, embed: Tensor, out_weight: Tensor | None, cache, cfg: TrainConfig) -> dict:
    """Held-out top-1 agreement with the base model's greedy tokens (what greedy acceptance
    checks, whatever labels trained the head), per step with teacher-forced inputs, and the
    chance the first k drafts are all right, whose sum + 1 estimates tokens per step at W=1."""
    positions = Positions(cache, cfg.draft_len, "distill", embed.device)
    rows = label_rows(head)
    was_training = head.training
    head.eval()
    correct = torch.zeros(cfg.draft_len)
    count = torch.zeros(cfg.draft_len)
    chain = torch.zeros(cfg.draft_len)
    with torch.no_grad():
        for i in range(0, len(positions), 1024):
            b = positions.batch(positions.index[i:i + 1024], embed.device)
            hit = (draft_logits(head, embed, out_weight, b.context, b.inputs).argmax(-1) == rows[b.labels]) & b.valid
            correct += hit.float().sum(0).cpu()
            count += b.valid.float().sum(0).cpu()
            chain += hit.cumprod(1).float().sum(0).cpu()
    head.train(was_training)
    n = max(len(positions), 1)
    return {"positions": len(positions), "draft_vocab_label_coverage": _coverage(head, positions),
            "acc": [round(float(c / max(m, 1)), 4) for c, m in zip(correct, count)],
            "all_correct_through_step": [round(float(c / n), 4) for c in chain],
            "expected_tokens_per_step_w1": round(1 + float(chain.sum() / n), 3)}


def export(head: DraftHead, out: Path, cfg: TrainConfig, metrics: dict, history: list[dict]) -> None:
    """The final drafter (Apple layout) plus training_config.json and metrics.json beside it."""
    dtype = getattr(torch, cfg.save_dtype)
    extra = {"training": {"labels": cfg.labels, "draft_len": cfg.draft_len, "base": cfg.base}}
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    save_drafter(head.eval(), tmp, extra=extra, dtype=dtype)  # whole, then each file into out (which holds more)
    for f in ("config.json", "model.safetensors"):
        os.replace(tmp / f, out / f)
    shutil.rmtree(tmp)
    _write_json(out / "training_config.json", asdict(cfg))
    _write_json(out / "metrics.json", metrics | {"history": thin_history(history)})


def thin_history(history: list[dict], keep: int = 1000, tail: int = 20) -> list[dict]:
    """At most about `keep` evenly spaced records plus the last `tail`: a loss curve that
    ships beside the weights, not one record per step (tens of thousands on a long run)."""
    stride = max(1, -(-len(history) // keep))
    return [h for i, h in enumerate(history) if i % stride == 0 or i >= len(history) - tail]


def _coverage(head: DraftHead, positions: Positions) -> float:
    """Fraction of the labels (all steps) that the head's draft vocabulary contains."""
    labels = positions.labels[positions.valid]
    if head.draft_vocab is None or not len(labels):
        return 1.0
    return round(float(np.isin(labels, head.draft_vocab.cpu().numpy()).mean()), 4)


def _mean_recent(history: list[dict], n: int = 20) -> dict:
    recent = history[-n:]
    if not recent:
        return {}
    k = len(recent[0]["acc"])
    return {"loss": round(sum(r["loss"] for r in recent) / len(recent), 4),
            "acc": [round(sum(r["acc"][j] for r in recent) / len(recent), 4) for j in range(k)]}


def _default_cache_root() -> Path:
    from redrafter.runtime.loading import cache_root

    return cache_root() / "teacher"


def _save_checkpoint(path: Path, cfg: TrainConfig, head: DraftHead, opt, sched, state: dict) -> None:
    """Head (Apple layout, loadable with load_drafter) + optimizer tensors + trainer state, atomically."""
    with atomic_dir(path) as tmp:
        save_drafter(head, tmp)
        opt_state = opt.state_dict()
        names = {i: n for i, (n, _) in enumerate(head.named_parameters())}
        tensors = {f"{names[i]}.{k}": v.contiguous() for i, s in opt_state["state"].items() for k, v in s.items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                  for g in opt_state["param_groups"]]
        _write_json(tmp / "trainer_state.json", state | {"run": cfg.run_key(), "param_groups": groups,
                                                         "scheduler": sched.state_dict()})


def _load_checkpoint(path: Path, cfg: TrainConfig, head: DraftHead, opt, sched) -> dict:
    saved = json.loads((path / "trainer_state.json").read_text())
    if saved["run"] != cfg.run_key():
        diff = sorted(k for k in cfg.run_key() if saved["run"].get(k) != cfg.run_key()[k])
        raise ValueError(f"--resume: the checkpoint in {str(path.parent)!r} was trained with other settings "
                         f"({', '.join(diff)}); resume with the same settings or start a new --output")
    head.load_state_dict(load_drafter(path).state_dict())
    tensors = load_file(str(path / "optimizer.safetensors"))
    names = [n for n, _ in head.named_parameters()]
    opt_state = {i: {k.removeprefix(n + "."): v for k, v in tensors.items() if k.rsplit(".", 1)[0] == n}
                 for i, n in enumerate(names)}
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in saved["param_groups"]]
    opt.load_state_dict({"state": {i: s for i, s in opt_state.items() if s}, "param_groups": groups})
    sched.load_state_dict(saved["scheduler"])
    return {k: saved[k] for k in ("step", "history", "train_seconds", "teacher_seconds")}


def _write_json(path: Path, obj: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))
