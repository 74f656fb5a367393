"""The redrafter:: custom ops: beam drafting and packed verification as single graph nodes.

Importing this module registers four ops with torch.library (namespace "redrafter"):

- beam_draft: the draft head's whole W x L beam search -> beams [B, W, L] (vocabulary ids,
  also with a draft vocabulary: the head's output rows are mapped to their token ids);
- pack_beams: prefix dedup -> fixed-size packed tokens [B, W*L], depths, unpacker,
  tree mask [B, W*L, W*L] and n_tokens [B] (padding tokens see only themselves; a beam may
  end in PAD, as in runtime.tree);
- packed_attention: one layer's attention of the new (packed) tokens over their committed
  KV cache and over themselves under the tree mask, with GQA;
- kv_commit: move the accepted path's K/V entries into place (mutates the caches).

Every op's default implementation is the runtime's own code (runtime.beam_search,
runtime.tree, runtime.model), so the ops cannot drift from the reference decoder; on CUDA
tensors they dispatch to the Triton kernels in plugins/kernels. Fake implementations give
static output shapes, so torch.export / torch.compile see each op as one node, and
plugins.onnx maps each node to an ONNX op of the same name for a TensorRT plugin.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..runtime.beam_search import beam_search as _beam_search, search_tree_beams
from ..runtime.config import DecodeConfig
from ..runtime.decoding import Steps
from ..runtime.drafter import DraftHead, DrafterConfig, check_draft_vocab
from ..runtime.model import KVCache, Llama, TreeMask, attend, attention_mask, commit_kv
from ..runtime.tree import PackedBeams, pack_beams as _pack_beams

NAMESPACE = "redrafter"


# DraftHeads viewing the weights of recent beam_draft calls, keyed by every tensor's identity: a
# decoder passes the same weights at every step, and building the head (a module on the meta device,
# then load_state_dict) on every call cost more than a small model's draft. The head holds its
# tensors, so a key's storage cannot be freed and reused while it is cached.
_HEADS: dict[tuple, DraftHead] = {}  # at most 8


def _draft_head(*tensors: Optional[Tensor] | list[Tensor]) -> DraftHead:
    flat = [t for x in tensors for t in (x if isinstance(x, list) else [x])]
    key = tuple(None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in flat)
    if key not in _HEADS:
        if len(_HEADS) >= 8:
            _HEADS.pop(next(iter(_HEADS)))
        _HEADS[key] = _new_draft_head(*tensors)
    return _HEADS[key]


def _new_draft_head(embed: Tensor, rnn_w: Optional[Tensor], rnn_u_weight: Optional[Tensor],
                rnn_u_bias: Optional[Tensor], input_proj_weight: Optional[Tensor],
                input_proj_bias: Optional[Tensor], res_weights: list[Tensor], res_biases: list[Tensor],
                out_weight: Tensor, base_lm_head: Optional[Tensor], draft_vocab: Optional[Tensor]) -> DraftHead:
    """A DraftHead viewing the given tensors (no copies), so the reference is runtime code."""
    vocab, hidden = embed.shape
    cfg = DrafterConfig(vocab, hidden, out_weight.shape[1], len(res_weights), rnn=rnn_w is not None,
                        head="shared" if base_lm_head is not None else "own",
                        draft_vocab_size=0 if draft_vocab is None else draft_vocab.numel())
    if base_lm_head is not None and base_lm_head.shape != (cfg.out_vocab, hidden):
        raise ValueError(f"beam_draft: base_lm_head is {list(base_lm_head.shape)}, expected "
                         f"[{cfg.out_vocab}, {hidden}]: pass DraftHead.output_weight(lm_head), the rows "
                         "of the draft vocabulary")
    state = {f"lm_head.{len(res_weights)}.weight": out_weight}
    for i, (w, b) in enumerate(zip(res_weights, res_biases, strict=True)):
        state[f"lm_head.{i}.linear.weight"], state[f"lm_head.{i}.linear.bias"] = w, b
    if rnn_w is not None:
        state |= {"rnn_w.weight": rnn_w, "rnn_u.weight": rnn_u_weight, "rnn_u.bias": rnn_u_bias}
    if input_proj_weight is not None:
        state |= {"input_proj.weight": input_proj_weight, "input_proj.bias": input_proj_bias}
    missing = [k for k, v in state.items() if v is None]
    if missing:
        raise ValueError(f"beam_draft: {', '.join(missing)} missing: give the whole rnn_* / input_proj_* group")
    if draft_vocab is not None:
        state["draft_vocab"] = check_draft_vocab(draft_vocab, cfg)
    with torch.device("meta"):
        head = DraftHead(cfg).requires_grad_(False)
    try:
        head.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise ValueError(f"beam_draft: the head weights do not fit together: {e}") from None
    return head


def _check_draft(context: Tensor, first_token: Tensor, width: int, length: int) -> None:
    if width < 1 or length < 1:
        raise ValueError(f"beam_draft needs width >= 1 and length >= 1, got W={width}, L={length}")
    if context.dim() != 2 or first_token.shape != context.shape[:1]:
        raise ValueError(f"beam_draft needs context [B, H] and first_token [B], got "
                         f"{tuple(context.shape)} and {tuple(first_token.shape)}")


def _beam_draft(context: Tensor, first_token: Tensor, embed: Tensor,
               rnn_w: Optional[Tensor], rnn_u_weight: Optional[Tensor], rnn_u_bias: Optional[Tensor],
               input_proj_weight: Optional[Tensor], input_proj_bias: Optional[Tensor],
               res_weights: list[Tensor], res_biases: list[Tensor], out_weight: Tensor,
               base_lm_head: Optional[Tensor], draft_vocab: Optional[Tensor], width: int, length: int,
               keep_prefixes: bool = False) -> Tensor:
    """Draft `width` beams of `length` tokens (guaranteed token first) -> beams [B, W, L] int64
    (keep_prefixes: the search tree, [B, W * max(L-1, 1), L], see runtime.beam_search).

    context [B, H]: base hidden state at the last accepted token; first_token [B]; embed
    [V, H]: base input embedding. The head is given by its weights: rnn_* absent means
    rnn=False; base_lm_head present means the "shared" head (out_weight [H, E]), absent the
    "own" head. draft_vocab [Vd] (increasing int64 token ids) present: output row i scores
    token draft_vocab[i], and base_lm_head [Vd, H] (the base LM head's rows for those ids,
    DraftHead.output_weight) / out_weight [Vd, E] have one row per draft token; absent:
    [V, H] / [V, E]. Beams hold vocabulary ids either way.
    """
    _check_draft(context, first_token, width, length)
    head = _draft_head(embed, rnn_w, rnn_u_weight, rnn_u_bias, input_proj_weight, input_proj_bias,
                       res_weights, res_biases, out_weight, base_lm_head, draft_vocab)
    beams, _ = _beam_search(head, embed, base_lm_head, context, first_token, width, length,
                            keep_prefixes=keep_prefixes)
    return beams.clone(memory_format=torch.contiguous_format)  # L=1: a view of first_token


beam_draft = torch.library.custom_op(f"{NAMESPACE}::beam_draft", _beam_draft, mutates_args=())


@beam_draft.register_fake
def _(context, first_token, embed, rnn_w, rnn_u_weight, rnn_u_bias, input_proj_weight, input_proj_bias,
      res_weights, res_biases, out_weight, base_lm_head, draft_vocab, width, length, keep_prefixes=False):
    _check_draft(context, first_token, width, length)
    beams = search_tree_beams(width, length) if keep_prefixes else width
    return context.new_empty(context.shape[0], beams, length, dtype=torch.long)


def _pack_beams_padded(beams: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """beams [B, W, L] -> tokens [B, W*L], depth [B, W*L], unpacker [B, W, L],
    mask [B, W*L, W*L] bool, n_tokens [B]; entries past n_tokens are padding (token 0,
    depth 0, visible only to themselves)."""
    b, w, l = beams.shape
    t_max = w * l
    p = _pack_beams(beams)
    t = p.tokens.shape[1]
    tokens = torch.nn.functional.pad(p.tokens, (0, t_max - t))
    depth = torch.nn.functional.pad(p.depth, (0, t_max - t))
    mask = torch.eye(t_max, dtype=torch.bool, device=beams.device).repeat(b, 1, 1)
    mask[:, :t, :t] = p.mask
    return tokens, depth, p.unpacker.clone(), mask, p.n_tokens.clone()


pack_beams = torch.library.custom_op(f"{NAMESPACE}::pack_beams", _pack_beams_padded, mutates_args=())


@pack_beams.register_fake
def _(beams):
    b, w, l = beams.shape
    t = w * l
    return (beams.new_empty(b, t), beams.new_empty(b, t), beams.new_empty(b, w, l),
            beams.new_empty(b, t, t, dtype=torch.bool), beams.new_empty(b))


def _packed_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                     starts: Tensor, tree_mask: Tensor) -> Tensor:
    """One layer's attention for T new tokens per row -> [B, T, heads, head_dim].

    q [B, T, heads, d]; k, v [B, T, kv_heads, d]: the new tokens' (RoPE'd) keys/values;
    k_cache, v_cache [slots, capacity, kv_heads, d]: one layer of KVCache; slots, starts [B]:
    cache row and committed length; tree_mask [B, T, T]. Token t sees its row's cache
    entries [0, starts) and the new tokens u with tree_mask[t, u]; scale 1/sqrt(d).
    """
    b, t = q.shape[:2]
    span = int(starts.max()) + t
    rows = torch.arange(b, device=q.device)[:, None]
    keys = torch.cat((k_cache[slots, :span], k.new_zeros(b, t, *k.shape[2:])), dim=1)  # room past capacity
    vals = torch.cat((v_cache[slots, :span], v.new_zeros(b, t, *v.shape[2:])), dim=1)
    pos = starts[:, None] + torch.arange(t, device=q.device)
    keys[rows, pos], vals[rows, pos] = k, v
    return attend(q, keys[:, :span], vals[:, :span], attention_mask(starts, tree_mask, span))


packed_attention = torch.library.custom_op(f"{NAMESPACE}::packed_attention", _packed_attention, mutates_args=())


@packed_attention.register_fake
def _(q, k, v, k_cache, v_cache, slots, starts, tree_mask):
    return torch.empty_like(q)


def _kv_commit(k_cache: Tensor, v_cache: Tensor, slots: Tensor, starts: Tensor, src: Tensor) -> None:
    """Move entries starts+src[:, i] to starts+i in every layer of both caches
    ([layers, slots, capacity, kv_heads, d]); src [B, n] with src[:, i] >= i."""
    commit_kv(k_cache, v_cache, slots, starts, src)


kv_commit = torch.library.custom_op(f"{NAMESPACE}::kv_commit", _kv_commit, mutates_args=("k_cache", "v_cache"))


@kv_commit.register_fake
def _(k_cache, v_cache, slots, starts, src):
    return None


OPS = {"beam_draft": beam_draft, "pack_beams": pack_beams, "packed_attention": packed_attention,
       "kv_commit": kv_commit}
# The default (runtime-code) implementations, to restore a device's kernel after swapping it.
REFERENCES: dict[str, Callable] = {"beam_draft": _beam_draft, "pack_beams": _pack_beams_padded,
                                   "packed_attention": _packed_attention, "kv_commit": _kv_commit}


def triton_kernel(name: str) -> Callable:
    """The CUDA implementation of op `name`: its Triton launcher, imported on first call."""

    def run(*args, **kwargs):
        from . import kernels  # imports triton only when a CUDA tensor reaches the op

        return getattr(kernels, name)(*args, **kwargs)

    run.__name__ = f"triton_{name}"
    return run


for _name, _op in OPS.items():
    _op.register_kernel("cuda", triton_kernel(_name))


# Runtime-facing helpers: the same calls as runtime.beam_search / runtime.tree / KVCache.


def head_weights(head: DraftHead, base_lm_head: Tensor | None) -> dict[str, object]:
    """beam_draft's weight arguments for a DraftHead; base_lm_head (shared head only) is
    head.output_weight(lm_head), gathered once by the caller rather than on every call."""
    res = list(head.lm_head)[:-1]
    rnn = head.cfg.rnn
    return dict(
        rnn_w=head.rnn_w.weight if rnn else None, rnn_u_weight=head.rnn_u.weight if rnn else None,
        rnn_u_bias=head.rnn_u.bias if rnn else None,
        input_proj_weight=head.input_proj.weight if head.input_proj is not None else None,
        input_proj_bias=head.input_proj.bias if head.input_proj is not None else None,
        res_weights=[r.linear.weight for r in res], res_biases=[r.linear.bias for r in res],
        out_weight=head.lm_head[-1].weight,
        base_lm_head=base_lm_head if head.cfg.head == "shared" else None, draft_vocab=head.draft_vocab,
    )


def draft(head: DraftHead, embed: Tensor, base_lm_head: Tensor | None, context: Tensor,
          first_token: Tensor, width: int, length: int, keep_prefixes: bool = False) -> Tensor:
    """runtime.beam_search through redrafter::beam_draft -> beams [B, W, L] (keep_prefixes: the
    search tree's); base_lm_head as there: head.output_weight(lm_head) for a shared head."""
    if head.cfg.head == "shared" and base_lm_head is None:
        raise ValueError("a shared-head drafter needs the base model's LM head weight")
    return torch.ops.redrafter.beam_draft(context, first_token, embed, **head_weights(head, base_lm_head),
                                          width=width, length=length, keep_prefixes=keep_prefixes)


class PluginSteps(Steps):
    """A decoder's stages through the redrafter:: ops (Triton kernels on CUDA, the runtime's code
    elsewhere): draft, pack, attention and commit."""

    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache, slots: Tensor, starts: Tensor,
                tree_mask: Tensor) -> Tensor:
        Llama.check_span(starts, tokens.shape[1], cache)
        return self.model.forward_masked(tokens, positions, cache, slots, starts, TreeMask(starts, tree_mask))

    def draft(self, head: DraftHead, base_head: Tensor | None, context: Tensor, first: Tensor,
              config: DecodeConfig) -> Tensor:
        return draft(head, self.model.embed.weight, base_head, context, first, config.beam_width, config.beam_length,
                     keep_prefixes=config.keep_prefixes)

    def pack(self, beams: Tensor) -> PackedBeams:
        return pack(beams)

    def commit(self, cache: KVCache, slots: Tensor, starts: Tensor, path: Tensor) -> None:
        commit(cache, slots, starts, path)


def pack(beams: Tensor) -> PackedBeams:
    """runtime.tree.pack_beams through redrafter::pack_beams, cut to the longest row."""
    tokens, depth, unpacker, mask, n_tokens = torch.ops.redrafter.pack_beams(beams)
    t = int(n_tokens.max())
    return PackedBeams(tokens[:, :t], depth[:, :t], unpacker, mask[:, :t, :t], n_tokens)


def commit(cache: KVCache, slots: Tensor, starts: Tensor, src: Tensor) -> None:
    """KVCache.commit through redrafter::kv_commit."""
    torch.ops.redrafter.kv_commit(cache.k, cache.v, slots, starts, src)
