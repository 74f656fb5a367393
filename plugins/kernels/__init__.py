"""OpenAI Triton kernels behind the redrafter:: ops on NVIDIA GPUs.

Each launcher takes the op's arguments and returns its outputs. Importing this package
imports triton; kernels are decorated at import, so set TRITON_INTERPRET=1 before the
first import to run them on CPU tensors (tests do).
"""
from .attention import packed_attention
from .commit import kv_commit
from .draft import beam_draft
from .tree import pack_beams

__all__ = ["beam_draft", "kv_commit", "pack_beams", "packed_attention"]
