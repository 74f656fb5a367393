"""Shared fixtures: a tiny random Llama (GQA) in two flavours and the real SmolLM2."""
from __future__ import annotations

import os
import socket
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    from redrafter.runtime.loading import SMOLLM2_135M

    model = tiny_llama(tied=True, vocab=SMOLLM2_135M["vocab_size"], eos_token_ids=[2], bos_token_id=1)
    base = save_hf_checkpoint(model, root / "base", tokenizer_dir=smollm2_dir)
    drafter = save_drafter(tiny_drafter(model, head="shared", draft_vocab_size=4096), root / "drafter")
    return base, drafter


# --- tiers (pyproject.toml lists the markers) ---------------------------------------------------

REAL_MODEL_FIXTURES = {"smollm2", "smollm2_dir", "tiny_hf_dir", "mtbench_prompts"}
TIER_BY_MODULE = {"test_builder": "engine", "test_plugins_onnx": "engine", "test_plugins_kernels": "kernels",
                  "test_serving_server": "server", "test_reliability": "server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test its tier, so that `pytest -m unit` is the edit loop's fast run: `slow`
    where it reads the real SmolLM2 (or its tokenizer), `engine` where it builds and compiles
    engines, `kernels` where it runs the Triton kernels (interpreted, or compiled for a GPU),
    `server` where it starts tritonserver, `unit` for the rest. CI runs them all."""
    for item in items:
        tiers = {m.name for m in item.iter_markers()} & {"slow", "engine", "kernels", "server"}
        module_tier = TIER_BY_MODULE.get(item.module.__name__.rsplit(".", 1)[-1]) if item.module else None
        if module_tier:
            tiers.add(module_tier)
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            tiers.add("slow")
        for tier in tiers or {"unit"}:
            item.add_marker(tier)
# --- the real tritonserver (tests/test_serving_server.py, tests/test_reliability.py) ---------------

SERVED_MODEL = "redrafter"
SERVED_SLOTS = 16
SERVED_MAX_SEQ_LEN = 512


@dataclass
class Served:
    server: Any  # redrafter.serving.server.TritonServer
    offline: Any  # the same Session the model instance runs, in this process
    repository: Path
    engine: Path

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(self.server.metrics_url, timeout=10) as r:
            lines = r.read().decode().splitlines()
        want = [f'{k}="{v}"' for k, v in labels.items()]
        values = [float(l.rsplit(" ", 1)[1]) for l in lines
                  if l.startswith(name + "{") and all(w in l for w in want)]
        assert len(values) == 1, f"expected one {name} {labels} series, found {len(values)}"
        return values[0]


def grpc_tensors(inputs: dict[str, Any]) -> list[Any]:
    """tritonclient gRPC input tensors of named numpy arrays."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, value in inputs.items():
        t = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        t.set_data_from_numpy(value)
        tensors.append(t)
    return tensors


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="session")
def served(tiny_hf_dir, tmp_path_factory):
    """One tritonserver for the session (it takes a while to start) on an engine of the tiny
    random Llama + drafter, and the offline Session of the same engine."""
    from redrafter.builder.build import BuildOptions, build_engine
    from redrafter.runtime.config import DecodeConfig
    from redrafter.serving.repository import ModelSource, write_repository
    from redrafter.serving.server import TritonServer

    base, drafter = tiny_hf_dir
    tmp = tmp_path_factory.mktemp("triton")
    # A small tree (W=2, L=3) keeps the random drafter's wasted verification cheap on CI's 2 cores.
    engine = build_engine(BuildOptions(output=tmp / "engine", base=base, drafter=drafter, backend="eager",
                                       decode=DecodeConfig(beam_width=2, beam_length=3), max_batch_size=SERVED_SLOTS,
                                       max_seq_len=SERVED_MAX_SEQ_LEN, progress=False))
    source = ModelSource.create(engine=engine)  # decoder slots: the engine's
    repo = write_repository(tmp / "repo", source, name=SERVED_MODEL)
    http, grpc, metrics = free_ports(3)
    # One torch thread: the tiny model gains nothing from two, and on a CPU shared with other jobs
    # two spinning OpenMP pools stall every step.
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, log=tmp / "tritonserver.log",
                          threads=1)
    server.start(ready_timeout_s=240)
    offline = source.open_session()
    try:
        yield Served(server, offline, repo, engine)
    finally:
        offline.close()
        server.stop()
