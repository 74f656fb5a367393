"""Loading a base model, its tokenizer and a drafter together, with the project's defaults."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .drafter import DraftHead, check_compatible, load_drafter
from .loading import load_base, load_tokenizer
from .model import Llama



def default_drafter_dir() -> Path:
    """The drafter shipped for SmolLM2-135M-Instruct (package data of `redrafter`)."""
    import redrafter

    return Path(redrafter.__file__).resolve().parent / "drafters" / "smollm2-135m-instruct"


@dataclass
class Loaded:
    model: Llama
    tokenizer: object
    drafter: DraftHead | None
    base_dir: Path

    @property
    def eos_ids(self) -> list[int]:
        return eos_ids(self.model, self.tokenizer)

    def encode_chat(self, text: str) -> list[int]:
        return encode_chat(self.tokenizer, text)


def eos_ids(model: Llama, tokenizer) -> list[int]:
    """End-of-sequence ids: the model config's, plus the tokenizer's own (the chat end token)."""
    ids = list(model.cfg.eos_token_ids)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None and tok_eos not in ids:
        ids.append(tok_eos)
    return ids


def encode_chat(tokenizer, text: str) -> list[int]:
    """The prompt rendered with the model's own chat template (plain text if it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                  add_generation_prompt=True, return_dict=False))
    return list(tokenizer.encode(text))


def load(base: str | os.PathLike | None = None, drafter: str | os.PathLike | None = "default",
         dtype: torch.dtype = torch.float32, device: str = "cpu") -> Loaded:
    """drafter: a directory, "default" (our shipped SmolLM2 drafter), or None for no drafter."""
    model, base_dir = load_base(base, dtype=dtype, device=device)
    head = None
    if drafter is not None:
        path = default_drafter_dir() if str(drafter) == "default" else Path(drafter)
        if not path.exists():
            raise FileNotFoundError(f"drafter directory {str(path)!r} does not exist "
                                    "(train one with `redrafter train`, or pass --no-spec)")
        head = load_drafter(path, dtype=dtype, device=device)
        check_compatible(head.cfg, model.cfg.vocab_size, model.cfg.hidden_size)
    return Loaded(model, load_tokenizer(base_dir), head, base_dir)
