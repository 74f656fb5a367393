"""Shared fixtures: a tiny random Llama (GQA) in two flavours and the real SmolLM2."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

from redrafter.runtime.drafter import DraftHead, DrafterConfig
from redrafter.runtime.model import Llama, LlamaConfig

# Tests never time tactics: the gate picks, in CANDIDATES' order (runtime.tactics), and its plans
# are cached for this run only.
os.environ.setdefault("REDRAFTER_TACTICS", "gate")
os.environ.setdefault("REDRAFTER_CACHE", tempfile.mkdtemp(prefix="redrafter-test-cache-"))


def tiny_config(tied: bool = False, vocab: int = 97, **kw) -> LlamaConfig:
    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, tie_word_embeddings=tied, rope_theta=10000.0, eos_token_ids=[])
    return LlamaConfig(**(base | kw))


def tiny_llama(tied: bool = False, seed: int = 0, **kw) -> Llama:
    """A random Llama whose outputs vary with the prompt (weights drawn with a large std)."""
    torch.manual_seed(seed)
    model = Llama(tiny_config(tied, **kw))
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.3)
    return model.eval().requires_grad_(False)


def tiny_drafter(model: Llama, head: str = "own", seed: int = 1, draft_vocab_size: int = 0, **kw) -> DraftHead:
    """A random head; draft_vocab_size > 0 gives it a random draft vocabulary of that size."""
    torch.manual_seed(seed)
    cfg = DrafterConfig.for_base(model.cfg.vocab_size, model.cfg.hidden_size, head=head,
                                 draft_vocab_size=draft_vocab_size, **kw)
    vocab = torch.randperm(model.cfg.vocab_size)[:draft_vocab_size].sort().values if draft_vocab_size else None
    d = DraftHead(cfg, vocab)
    for p in d.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return d.eval().requires_grad_(False)


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def tiny_model(request) -> Llama:
    return tiny_llama(tied=request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32), its tokenizer and HF directory."""
    from redrafter.runtime.pipeline import load

    return load("default", drafter=None)


@pytest.fixture(scope="session")
def mtbench_prompts() -> list[str]:
    """First turns of the first four MT-Bench questions."""
    from redrafter.datasets import mtbench_first_turns

    return mtbench_first_turns(4)


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF directory of the real SmolLM2 (converted once from the packaged GGUF)."""
    from redrafter.runtime.loading import resolve_base

    return resolve_base("default")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama saved as an HF directory with SmolLM2's real tokenizer and chat
    template (vocab 49152), plus a matching random shared-head drafter directory with a draft
    vocabulary (4096 ids, as the shipped drafter has one). Returns (base_dir, drafter_dir)."""
    from redrafter.runtime.drafter import save_drafter
    from redrafter.runtime.loading import save_hf_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(tied=True, vocab=49152, eos_token_ids=[2], bos_token_id=1)
    base = save_hf_checkpoint(model, root / "base", tokenizer_dir=smollm2_dir)
    drafter = save_drafter(tiny_drafter(model, head="shared", draft_vocab_size=4096), root / "drafter")
    return base, drafter
