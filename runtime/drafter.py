"""The recurrent draft head (ReDrafter) and its checkpoint format.

s_t = SiLU(W e(x_{t-1}) + U s_{t-1} + b), s_0 = 0      (rnn=True)
s_t = s_{t-1} + e(x_{t-1})                              (rnn=False)
logits_t = head([h ; s_t])

h is the base model's final-norm hidden state at the last accepted token and e() the
base model's frozen input embedding; both come from the base model, so the head owns
neither. Two heads:
- "own" (Apple's): optional input_proj, ResBlocks over exit_dim, Linear(exit_dim -> vocab);
- "shared" (ours): ResBlocks, Linear(exit_dim -> hidden), then the base model's LM head,
  which keeps a drafter for a small model at a few MB instead of ~60M parameters.

A draft vocabulary (draft_vocab_size > 0) restricts either head to the tokens it is likely
to be right about: output row i scores token draft_vocab[i]. The base model still verifies
every token, so this changes speed, never the output; it makes each draft step's vocabulary
projection (the largest cost of drafting for a small base model) several times cheaper.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .atomic import atomic_dir

MODEL_TYPE = "recurrent_drafting_drafter"
HEADS = ("own", "shared")


@dataclass
class DrafterConfig:
    vocab_size: int
    hidden_size: int
    exit_dim: int
    num_draft_layers: int = 2
    rnn: bool = True
    head: str = "own"
    draft_vocab_size: int = 0  # 0: the whole vocabulary

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"drafter head must be one of {HEADS}, got {self.head!r}")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in [0, vocab_size={self.vocab_size}], "
                             f"got {self.draft_vocab_size}")

    @property
    def out_vocab(self) -> int:
        """Rows of the head's output: the draft vocabulary's size, or the whole vocabulary."""
        return self.draft_vocab_size or self.vocab_size

    @classmethod
    def for_base(cls, vocab_size: int, hidden_size: int, head: str = "shared",
                 num_draft_layers: int = 2, rnn: bool = True, draft_vocab_size: int = 0) -> "DrafterConfig":
        return cls(vocab_size, hidden_size, 2 * hidden_size, num_draft_layers, rnn, head, draft_vocab_size)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_type"] = MODEL_TYPE
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DrafterConfig":
        if d.get("model_type") != MODEL_TYPE:
            raise ValueError(f"config.json model_type is {d.get('model_type')!r}, expected {MODEL_TYPE!r}")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], exit_dim=d["exit_dim"],
            num_draft_layers=d["num_draft_layers"], rnn=d.get("rnn", True), head=d.get("head", "own"),
            draft_vocab_size=d.get("draft_vocab_size", 0),
        )


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.silu(self.linear(x))


class DraftHead(nn.Module):
    """Parameter names follow Apple's checkpoint (lm_head.i.linear, lm_head.n, rnn_u, rnn_w)."""

    def __init__(self, cfg: DrafterConfig, draft_vocab: Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        h, e = cfg.hidden_size, cfg.exit_dim
        if cfg.rnn:
            self.rnn_w = nn.Linear(h, h, bias=False)
            self.rnn_u = nn.Linear(h, h, bias=True)
        self.input_proj = nn.Linear(2 * h, e) if e != 2 * h else None
        out = nn.Linear(e, cfg.out_vocab if cfg.head == "own" else h, bias=False)
        self.lm_head = nn.Sequential(*[ResBlock(e) for _ in range(cfg.num_draft_layers)], out)
        self.draft_vocab: Tensor | None  # [Vd] int64 token ids, increasing
        if cfg.draft_vocab_size:
            # Without ids: a placeholder that load_state_dict fills (load_drafter checks them).
            ids = (torch.zeros(cfg.draft_vocab_size, dtype=torch.long) if draft_vocab is None
                   else check_draft_vocab(draft_vocab, cfg))
            self.register_buffer("draft_vocab", ids)
        else:
            if draft_vocab is not None:
                raise ValueError("draft_vocab given but the config's draft_vocab_size is 0")
            self.draft_vocab = None

    def output_weight(self, base_lm_head: Tensor | None) -> Tensor | None:
        """What `logits` multiplies by for the shared head: the base LM head's rows for the
        draft vocabulary [Vd, H] (the whole head without one). Callers compute it once per
        model, since gathering the rows on every draft step would cost as much as using them."""
        if self.cfg.head != "shared":
            return None
        if base_lm_head is None:
            raise ValueError("a shared-head drafter needs the base model's LM head weight")
        return base_lm_head if self.draft_vocab is None else base_lm_head.index_select(0, self.draft_vocab)

    def token_ids(self, rows: Tensor) -> Tensor:
        """Vocabulary token ids of output rows."""
        return rows if self.draft_vocab is None else self.draft_vocab[rows]

    def step(self, state: Tensor, token_emb: Tensor) -> Tensor:
        """One recurrence update; state and token_emb [..., H]."""
        if self.cfg.rnn:
            return F.silu(self.rnn_w(token_emb) + self.rnn_u(state))
        return state + token_emb

    def logits(self, context: Tensor, state: Tensor, base_lm_head: Tensor | nn.Module | None) -> Tensor:
        """Draft logits [..., Vd] (over the draft vocabulary) from the base hidden state and the
        recurrent state.

        base_lm_head (shared head only): `output_weight(...)` of the base model's LM head, or a
        module multiplying by it (a quantized engine's copy, builder.quantize.quantize_drafter).
        """
        z = torch.cat((context.expand_as(state), state), dim=-1)
        if self.input_proj is not None:
            z = self.input_proj(z)
        z = self.lm_head(z)
        if self.cfg.head == "shared":
            if base_lm_head is None:
                raise ValueError("a shared-head drafter needs the base model's LM head weight")
            z = base_lm_head(z) if isinstance(base_lm_head, nn.Module) else z @ base_lm_head.t()
        return z.float()


def check_draft_vocab(draft_vocab: Tensor, cfg: DrafterConfig) -> Tensor:
    """A draft vocabulary must be distinct, increasing token ids of the base vocabulary."""
    v = torch.as_tensor(draft_vocab).to(torch.long).flatten()
    if v.numel() != cfg.draft_vocab_size:
        raise ValueError(f"draft vocabulary has {v.numel()} ids but draft_vocab_size is {cfg.draft_vocab_size}")
    if v.numel() and (v.min() < 0 or v.max() >= cfg.vocab_size or bool((v[1:] <= v[:-1]).any())):
        raise ValueError(f"draft vocabulary must be increasing token ids in [0, {cfg.vocab_size})")
    return v


def check_compatible(cfg: DrafterConfig, vocab_size: int, hidden_size: int) -> None:
    if cfg.vocab_size != vocab_size or cfg.hidden_size != hidden_size:
        raise ValueError(
            f"drafter (vocab {cfg.vocab_size}, hidden {cfg.hidden_size}) does not fit the base model "
            f"(vocab {vocab_size}, hidden {hidden_size}): train a drafter for this base with `redrafter train`"
        )


def save_drafter(head: DraftHead, path: str | os.PathLike, extra: dict[str, Any] | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write Apple's layout: config.json + model.safetensors (atomically, via a temp dir)."""
    path = Path(path)
    with atomic_dir(path) as tmp:  # whole directories swap, so a reader never sees a mix
        cfg = head.cfg.to_json() | (extra or {})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().contiguous().cpu()
                 for k, v in head.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        for f in path.iterdir() if path.exists() else ():  # keep side files (model card, metrics)
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
    return path


def load_drafter(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> DraftHead:
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"drafter directory {str(path)!r} needs config.json and model.safetensors")
    head = DraftHead(DrafterConfig.from_json(json.loads(cfg_file.read_text())))
    state = load_file(str(weights))
    try:
        head.load_state_dict(state)
        if head.draft_vocab is not None:
            check_draft_vocab(head.draft_vocab, head.cfg)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"drafter weights in {str(path)!r} do not match its config.json: {e}") from None
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False)  # dtype: float tensors only
