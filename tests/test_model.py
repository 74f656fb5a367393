"""The base model against HF transformers: logits, RoPE scaling, the cache, and greedy output."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from redrafter.runtime.decoding import Decoder, generate
from redrafter.runtime.loading import load_base, save_hf_checkpoint
from redrafter.runtime.model import LlamaConfig, causal_mask, rope_inv_freq

from conftest import tiny_llama


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(1, ids.shape[1])
    n = ids.shape[1]
    hidden = model(ids, torch.arange(n)[None], cache, torch.tensor([0]), torch.tensor([0]), causal_mask(1, n))
    return model.logits(hidden)


@pytest.mark.parametrize("variant", [
    dict(tied=False), dict(tied=True), dict(attention_bias=True),
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
])
def test_logits_match_transformers(tmp_path, variant):
    tied = variant.pop("tied", False)
    model = tiny_llama(tied=tied, **variant)
    if model.cfg.attention_bias:  # give the q/k/v biases non-zero values
        for layer in model.layers:
            for lin in (layer.attn.wq, layer.attn.wk, layer.attn.wv):
                torch.nn.init.normal_(lin.bias, std=0.3)
    path = save_hf_checkpoint(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = full_logits(model, ids), hf(ids).logits
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
    reloaded, _ = load_base(path)
    assert torch.equal(full_logits(reloaded, ids), ours)


def test_llama3_rope_scaling_changes_only_low_frequencies():
    plain = LlamaConfig(97, 64, 128, 1, 4, 2, 64, rope_theta=500000.0)
    scaled = LlamaConfig(97, 64, 128, 1, 4, 2, 64, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    a, b = rope_inv_freq(plain), rope_inv_freq(scaled)
    assert torch.equal(a[:4], b[:4])  # high frequencies untouched
    assert torch.allclose(b[-1], a[-1] / 8)  # lowest frequency divided by the factor


def test_unknown_rope_scaling_is_rejected():
    cfg = LlamaConfig(97, 64, 128, 1, 4, 2, 16, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        rope_inv_freq(cfg)


def test_incremental_decoding_equals_full_forward():
    """Prefill + one-token steps through the cache give the logits of one full forward."""
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = full_logits(model, ids)
    cache = model.new_cache(2, 16)
    slot = torch.tensor([1])
    out = [model.logits(model(ids[:, :5], torch.arange(5)[None], cache, slot, torch.tensor([0]), causal_mask(1, 5)))]
    for t in range(5, 12):
        out.append(model.logits(model(ids[:, t:t + 1], torch.tensor([[t]]), cache, slot, torch.tensor([t]),
                                      causal_mask(1, 1))))
    assert torch.allclose(torch.cat(out, 1), ref, atol=1e-4, rtol=1e-4)


def test_cache_overflow_is_a_clear_error():
    model = tiny_llama()
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="cache holds 8"):
        model(torch.zeros(1, 9, dtype=torch.long), torch.arange(9)[None], cache, torch.tensor([0]),
              torch.tensor([0]), causal_mask(1, 9))


@pytest.mark.slow
def test_smollm2_plain_greedy_equals_transformers(smollm2, mtbench_prompts):
    hf = AutoModelForCausalLM.from_pretrained(smollm2.base_dir, dtype=torch.float32).eval()
    prompts = [smollm2.encode_chat(p) for p in mtbench_prompts[:2]]
    ours = generate(Decoder(smollm2.model, None, max_seq_len=512), [prompts[0]], 48, smollm2.eos_ids)
    ours += generate(Decoder(smollm2.model, None, max_seq_len=512), [prompts[1]], 48, smollm2.eos_ids)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False,
                              eos_token_id=smollm2.eos_ids, pad_token_id=smollm2.eos_ids[0])
        assert got.token_ids == ref[0, len(prompt):].tolist()


def test_rope_frequencies_stay_float32_in_a_converted_model():
    """bfloat16 RoPE frequencies would shift every position's angle (and a compiled program
    must see the same constant in a converted and in a loaded model)."""
    model = tiny_llama().to(torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, rope_inv_freq(model.cfg))


def test_cpu_attention_runs_in_float32_for_lower_precision_models():
    """A bf16 model's attention on the CPU is the float32 computation rounded once (torch's
    bf16 CPU attention is several times slower for one query, and less exact)."""
    from redrafter.runtime.model import attend

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 20, 2, 8), torch.randn(2, 20, 2, 8)
    mask = torch.rand(2, 3, 20) > 0.3
    mask[..., 0] = True
    low = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert low.dtype == torch.bfloat16
    assert torch.equal(low, attend(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), mask).bfloat16())


def test_cache_gather_matches_index_select_into_buffers_it_reuses():
    """Eager CPU attention gathers each layer's keys/values into two buffers kept by the cache
    (a fresh 10 MB allocation per layer page-faulted at batch 32), so a gather's result is
    valid until the next gather."""
    cache = tiny_llama().new_cache(slots=3, capacity=10)
    cache.k.normal_(), cache.v.normal_()
    slots = torch.tensor([2, 0])
    keys, vals = cache.gather(1, slots, 7)
    assert torch.equal(keys, cache.k[1, :, :7].index_select(0, slots))
    assert torch.equal(vals, cache.v[1, :, :7].index_select(0, slots))
    buffers = keys.data_ptr(), vals.data_ptr()
    keys, vals = cache.gather(0, torch.tensor([1]), 4)
    assert (keys.data_ptr(), vals.data_ptr()) == buffers
    assert torch.equal(keys, cache.k[0, 1:2, :4]) and torch.equal(vals, cache.v[0, 1:2, :4])


def test_cache_gather_works_inside_and_then_outside_inference_mode():
    """The buffers are made with the cache, not lazily at a first gather under inference_mode
    (which would make them inference tensors that a later gather outside it cannot write)."""
    cache = tiny_llama().new_cache(slots=2, capacity=8)
    with torch.inference_mode():
        cache.gather(0, torch.tensor([1]), 3)
    keys, _ = cache.gather(0, torch.tensor([1]), 3)
    assert torch.equal(keys, cache.k[0, 1:2, :3])
