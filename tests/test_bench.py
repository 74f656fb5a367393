"""`redrafter bench`: figures, the JSON/PNG it writes, the identical-output check, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from redrafter.runtime.config import DecodeConfig
from redrafter.bench.metrics import agreement, figures, mismatches
from redrafter.bench.systems import Run
from redrafter.cli import main
from redrafter.datasets import jsonl_prompts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": "Write a haiku about autumn."}), json.dumps("What is 17 times 3?"),
             json.dumps({"turns": ["Name three rivers in Europe.", "And in Asia?"]})]
    path.write_text("\n".join(lines) + "\n")
    return path


def _bench(tiny_hf_dir, prompt_file, tmp_path, *extra: str) -> list[str]:
    base, drafter = tiny_hf_dir
    return ["bench", "--base", str(base), "--drafter", str(drafter), "--dataset", str(prompt_file),
            "--questions", "3", "--threads", "1", "--json", str(tmp_path / "bench.json"), *extra]


# ---- figures and comparisons (no model) ----

def test_figures_follow_the_paper_conventions():
    # Two groups: 2 prompts decoded together, then 1 prompt; drafts of length 3 (L=4).
    runs = [Run([[1, 2, 3, 4], [5, 6]], seconds=2.0, first_token_s=[0.1, 0.5], accepted_per_step=[[2], [0]]),
            Run([[7, 8, 9, 10, 11]], seconds=1.0, first_token_s=[0.5], accepted_per_step=[[3]])]
    f = figures(runs, draft_len=3)
    assert f["prompts"] == 3 and f["tokens"] == 11 and f["seconds"] == 3.0
    assert f["tok_per_s"] == pytest.approx(11 / 3.0)
    # Decode-only: tokens after each first token over the time after each group's last first token.
    assert f["prefill_seconds"] == pytest.approx(1.0)
    assert f["decode_tok_per_s"] == pytest.approx((11 - 3) / (3.0 - 1.0))
    assert f["ttft_s"] == pytest.approx((0.1 + 0.5 + 0.5) / 3)
    # Steps accepted 2, 0, 3 drafts: tokens per step counts the bonus token.
    assert f["tokens_per_step"] == pytest.approx((3 + 1 + 4) / 3)
    assert f["mean_accepted"] == pytest.approx(5 / 3)
    assert f["acceptance_by_position"] == pytest.approx([2 / 3, 2 / 3, 1 / 3])

    plain = figures([Run([[1, 2]], 1.0, [0.2], None)], draft_len=0)
    assert plain["tokens_per_step"] == 1.0 and plain["acceptance_by_position"] is None
    peer = figures([Run([[1, 2]], 1.0, [0.2], None)], draft_len=None)
    assert peer["tokens_per_step"] is None


def test_mismatches_and_agreement_locate_the_first_difference():
    ref = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]
    got = [[1, 2, 3, 4], [5, 0, 7], [8, 9, 10]]
    found = mismatches(ref, got)
    assert [(m.prompt, m.position, m.expected, m.got) for m in found] == [(1, 1, [6, 7], [0, 7]), (2, 2, [], [10])]
    a = agreement(ref, got)
    assert a["exact"] == pytest.approx(1 / 3)
    assert a["prefix"] == pytest.approx((1 + 1 / 3 + 2 / 3) / 3)
    assert mismatches(ref, ref) == []


def test_jsonl_prompts_formats_and_errors(tmp_path, prompt_file):
    assert jsonl_prompts(prompt_file) == ["Write a haiku about autumn.", "What is 17 times 3?",
                                          "Name three rivers in Europe."]
    assert jsonl_prompts(prompt_file, 2) == jsonl_prompts(prompt_file)[:2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a string"):
        jsonl_prompts(bad)
    bad.write_text('"fine"\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        jsonl_prompts(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jsonl_prompts(tmp_path / "missing.jsonl")


def test_named_datasets_are_mtbench_first_turns_and_sharegpt_heldout():
    from redrafter.bench import load_prompts
    from redrafter.datasets import mtbench_first_turns
    from redrafter.datasets import heldout_prompts

    assert load_prompts("mtbench", 3) == mtbench_first_turns(3) and len(mtbench_first_turns(3)) == 3
    assert load_prompts("sharegpt", 2) == heldout_prompts(2) and all(heldout_prompts(2))


# ---- the command on a tiny model ----

def test_bench_writes_json_and_png(tiny_hf_dir, prompt_file, tmp_path, capsys):
    from matplotlib.image import imread

    png = tmp_path / "plots" / "bench.png"
    rc = main(_bench(tiny_hf_dir, prompt_file, tmp_path, "--max-new-tokens", "6", "--batch-sizes", "1,2",
                     "--beam-width", "1,2", "--beam-length", "3", "--lookup", "0,2", "--lookup-length", "5",
                     "--peers", "hf,llamacpp",
                     "--plot", str(png)))
    assert rc == 0
    table = capsys.readouterr().out
    assert "redrafter W2 L3 +lookup2 L5" in table and "identical" in table

    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["schema"] == "redrafter-bench/1" and report["identical"] is True
    m = report["machine"]
    assert isinstance(m["cpu"], str) and m["cores"] >= 1 and m["threads"] == 1
    assert m["torch"] and m["date"][:2] == "20"
    assert "git_commit" in m and "git_dirty" in m
    s = report["settings"]
    assert s["questions"] == 3 and s["max_new_tokens"] == 6 and s["batch_sizes"] == [1, 2]
    assert s["configs"] == [[1, 3, 0, 0, "beams"], [1, 3, 2, 5, "beams"], [2, 3, 0, 0, "beams"], [2, 3, 2, 5, "beams"]]
    assert s["temperature"] == 0.0
    assert [p["index"] for p in report["prompts"]] == [0, 1, 2]
    assert all(p["prompt_tokens"] > 5 for p in report["prompts"])  # the chat template was applied
    # llama.cpp needs a GGUF file; this base is an HF directory.
    assert any("llama.cpp peer skipped" in n for n in report["notes"])

    by_key = {(r["label"], r["batch_size"]): r for r in report["results"]}
    labels = ("plain", "redrafter W1 L3", "redrafter W1 L3 +lookup2 L5", "redrafter W2 L3",
              "redrafter W2 L3 +lookup2 L5", "hf")
    assert set(by_key) == {(label, b) for b in (1, 2) for label in labels}
    for (label, b), r in by_key.items():
        assert r["prompts"] == 3 and 3 <= r["tokens"] <= 3 * 6
        for key in ("seconds", "tok_per_s", "ttft_s", "speedup"):
            assert isinstance(r[key], float) and r[key] > 0, (label, b, key)
        assert r["decode_tok_per_s"] is None or r["decode_tok_per_s"] > 0
        if r["system"] == "redrafter":
            acc = r["acceptance_by_position"]
            lookup = "+lookup2" in label  # its beam has 5 tokens, the drafted ones 3
            assert r["step_length"] == (5 if lookup else 3) and len(acc) == r["step_length"] - 1
            assert all(0 <= a <= 1 for a in acc)
            assert acc == sorted(acc, reverse=True)
            assert r["tokens_per_step"] == pytest.approx(1 + r["mean_accepted"])
            assert r["lookup_ngram"] == (2 if lookup else 0) and r["tree"] == "beams"
            assert r["identical"] is True and r["mismatches"] == [] and r["agreement"] is None
        elif r["system"] == "plain":
            assert r["speedup"] == 1.0 and r["tokens_per_step"] == 1.0 and r["identical"] is True
        else:
            assert r["identical"] is None and 0 <= r["agreement"]["exact"] <= 1
            assert 0 <= r["agreement"]["prefix"] <= 1
    # Lockstep batching does not change greedy outputs: batch 2 matched the batch-1 reference.
    assert by_key[("plain", 2)]["tokens"] == by_key[("plain", 1)]["tokens"]

    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_mismatch_with_plain_greedy_fails_loudly(tiny_hf_dir, prompt_file, tmp_path, monkeypatch, capsys):
    """A decoder whose bonus token is wrong must make the command exit non-zero, naming the prompt."""
    import redrafter.runtime.decoding as decoding

    real_verify = decoding.greedy_verify

    def wrong_bonus(beams, unpacker, predicted):
        out = real_verify(beams, unpacker, predicted)
        rows = torch.arange(out.tokens.shape[0])
        out.tokens[rows, out.counts - 1] = (out.tokens[rows, out.counts - 1] + 1) % 49152
        return out

    monkeypatch.setattr(decoding, "greedy_verify", wrong_bonus)
    rc = main(_bench(tiny_hf_dir, prompt_file, tmp_path, "--max-new-tokens", "4", "--beam-width", "2",
                     "--beam-length", "3", "--peers", "none"))
    assert rc == 1
    err = capsys.readouterr().err
    assert "OUTPUT MISMATCH: redrafter W2 L3 at batch 1" in err
    assert "prompt 0 ('Write a haiku about autumn.')" in err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["identical"] is False
    spec = next(r for r in report["results"] if r["system"] == "redrafter")
    assert spec["identical"] is False and len(spec["mismatches"]) == 3
    # The first token comes from prefill (right); the first step's bonus token is the wrong one.
    assert all(m["position"] >= 1 for m in spec["mismatches"])
    plain = next(r for r in report["results"] if r["system"] == "plain")
    assert plain["identical"] is True


def test_sampled_redrafter_equals_sampled_plain_per_seed(tiny_hf_dir, prompt_file, tmp_path):
    """With temperature > 0 (the serving Session), seeded ReDrafter output equals seeded plain
    output at every batch size, and differs from greedy decoding."""
    def outputs(*extra: str) -> dict:
        assert main(_bench(tiny_hf_dir, prompt_file, tmp_path, "--max-new-tokens", "6", "--beam-width", "2",
                           "--beam-length", "3", "--peers", "none", *extra)) == 0
        return json.loads((tmp_path / "bench.json").read_text())

    sampled = outputs("--temperature", "1.5", "--seed", "7", "--batch-sizes", "1,2")
    assert sampled["identical"] is True and sampled["settings"]["temperature"] == 1.5
    assert {(r["label"], r["batch_size"]) for r in sampled["results"]} == {
        (label, b) for label in ("plain", "redrafter W2 L3") for b in (1, 2)}
    spec = next(r for r in sampled["results"] if r["system"] == "redrafter")
    assert len(spec["acceptance_by_position"]) == 2 and spec["tokens_per_step"] >= 1.0
    greedy = outputs()
    assert [p["output_ids"] for p in sampled["prompts"]] != [p["output_ids"] for p in greedy["prompts"]]


def test_plain_only_without_a_drafter(tiny_hf_dir, prompt_file, tmp_path):
    rc = main(_bench(tiny_hf_dir, prompt_file, tmp_path, "--drafter", "none", "--max-new-tokens", "3",
                     "--peers", "none"))
    assert rc == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["label"] for r in report["results"]] == ["plain"] and report["settings"]["configs"] == []


# ---- bad input: clear errors before any model loads ----

@pytest.mark.parametrize("args, message", [
    (["--beam-width", "0"], "argument --beam-width: must be >= 1, got 0"),
    (["--beam-width", "2,x"], "argument --beam-width: expected an integer, got 'x'"),
    (["--beam-length", "2,0"], "argument --beam-length: must be >= 1, got 0"),
    (["--batch-sizes", "0,2"], "argument --batch-sizes: must be >= 1, got 0"),
    (["--batch-sizes", ","], "argument --batch-sizes: expected a comma-separated list, got ','"),
    (["--lookup", "-1"], "argument --lookup: must be >= 0, got -1"),
    (["--lookup-length", "-1"], "argument --lookup-length: must be >= 0, got -1"),
    (["--questions", "0"], "must be >= 1"),
    (["--peers", "vllm"], "unknown peer(s) ['vllm']"),
    (["--tree", "beams,bushy"], "argument --tree: expected beams or search, got 'bushy'"),
])
def test_bad_arguments_are_rejected_by_the_parser(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_datasets_give_clear_errors(tmp_path, capsys):
    assert main(["bench", "--dataset", "alpaca"]) == 2
    assert "unknown dataset 'alpaca': use mtbench, sharegpt or a path to a .jsonl file" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert main(["bench", "--dataset", str(empty)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert main(["bench", "--dataset", str(tmp_path / "nope.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_lookup_length_without_a_lookup_beam_is_refused(prompt_file, capsys):
    assert main(["bench", "--dataset", str(prompt_file), "--lookup-length", "8"]) == 2
    assert "--lookup-length sets the lookup beam's length: give --lookup N too" in capsys.readouterr().err


def test_bench_runs_a_built_engine(tiny_hf_dir, prompt_file, tmp_path, capsys):
    """--engine: plain and ReDrafter decoding of the same engine; the peers run --base."""
    from redrafter.builder.build import BuildOptions, build_engine

    base, drafter = tiny_hf_dir
    engine = build_engine(BuildOptions(output=tmp_path / "engine", base=base, drafter=drafter, backend="eager", max_batch_size=2, max_seq_len=128, progress=False, decode=DecodeConfig(beam_width=2, beam_length=3)))
    json_out = tmp_path / "bench.json"
    args = ["bench", "--engine", str(engine), "--base", str(base), "--dataset", str(prompt_file),
            "--max-new-tokens", "4", "--batch-sizes", "2", "--peers", "hf", "--json", str(json_out)]
    assert main(args) == 0
    report = json.loads(json_out.read_text())
    assert report["settings"]["engine"] == str(engine) and report["settings"]["configs"] == [[2, 3, 0, 0, "beams"]]
    assert [(r["label"], r["batch_size"]) for r in report["results"]] == [
        ("plain", 2), ("redrafter W2 L3", 2), ("hf", 2)]
    assert report["identical"] is True
    # Settings within the engine's built ones run (here the search tree, 1 + 2*2 <= 6 tokens, and W1 L2);
    # larger trees, a lookup beam it has no room for and larger batches are refused.
    assert main([*args, "--tree", "search", "--beam-width", "1,2", "--beam-length", "2,3", "--peers", "none"]) == 0
    report = json.loads(json_out.read_text())
    assert [r["label"] for r in report["results"]] == [
        "plain", "redrafter W1 L2 search-tree", "redrafter W1 L3 search-tree", "redrafter W2 L2 search-tree",
        "redrafter W2 L3 search-tree"] and report["identical"] is True
    capsys.readouterr()
    assert main([*args[:-2], "--beam-width", "4"]) == 2
    assert "W4 L3 (12 tree tokens) exceeds the engine " in capsys.readouterr().err
    assert main([*args[:-2], "--batch-sizes", "4"]) == 2
    assert "exceeds the engine's max batch size 2" in capsys.readouterr().err
    assert main([*args[:-2], "--lookup", "2"]) == 2
    assert "was built without a lookup beam: drop --lookup, or rebuild with --lookup N" in capsys.readouterr().err


def test_bench_compares_engines_in_one_rotation_each_against_its_own_plain_decoding(tiny_hf_dir, prompt_file,
                                                                                      tmp_path):
    """Several --engine take turns; an engine with a step program runs it ("fused") and its draft and
    forward programs ("unfused"), each checked against that engine's own plain decoding."""
    from redrafter.builder.build import BuildOptions, build_engine

    base, drafter = tiny_hf_dir
    engines = [build_engine(BuildOptions(output=tmp_path / name, base=base, drafter=drafter, backend=backend,
                                         max_batch_size=1, max_seq_len=128, progress=False,
                                         decode=DecodeConfig(beam_width=2, beam_length=3)))
               for name, backend in (("e", "eager"), ("o", "onnx"))]
    json_out = tmp_path / "bench.json"
    assert main(["bench", *(x for e in engines for x in ("--engine", str(e))), "--dataset", str(prompt_file),
                 "--max-new-tokens", "6", "--peers", "none", "--json", str(json_out)]) == 0
    report = json.loads(json_out.read_text())
    rows = {r["label"]: r for r in report["results"]}
    assert list(rows) == ["e plain", "e redrafter W2 L3", "o plain", "o redrafter W2 L3 unfused",
                          "o redrafter W2 L3 fused"]
    assert [r["engine"] for r in rows.values()] == ["e", "e", "o", "o", "o"]
    assert all(r["identical"] and r["mismatches"] == [] for r in rows.values())
    assert rows["e plain"]["tokens_per_step"] == 1.0 and rows["o redrafter W2 L3 fused"]["tokens_per_step"] >= 1.0
    assert [e["engine"] for e in report["settings"]["engines"]] == [str(e) for e in engines]


def test_bench_measures_the_final_beams_and_the_search_tree_side_by_side(tiny_hf_dir, prompt_file, tmp_path,
                                                                        capsys):
    rc = main(_bench(tiny_hf_dir, prompt_file, tmp_path, "--max-new-tokens", "8", "--beam-width", "3",
                     "--beam-length", "4", "--tree", "beams,search", "--peers", "none"))
    assert rc == 0
    assert "redrafter W3 L4 search-tree" in capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["settings"]["configs"] == [[3, 4, 0, 0, "beams"], [3, 4, 0, 0, "search"]]
    by_label = {r["label"]: r for r in report["results"]}
    assert set(by_label) == {"plain", "redrafter W3 L4", "redrafter W3 L4 search-tree"}
    assert by_label["redrafter W3 L4"]["tree"] == "beams" and by_label["redrafter W3 L4 search-tree"]["tree"] == "search"
    assert report["identical"] is True


# ---- a peer that crashes (llama.cpp built for AMX segfaulted so) ----

def _segfault_on_first_prompt(conn, *args) -> None:
    """A llama.cpp worker (systems._llamacpp_worker's protocol) that loads, then dies of SIGSEGV."""
    import os
    import signal

    conn.send("ready")
    conn.recv()
    os.kill(os.getpid(), signal.SIGSEGV)


def _segfault_on_load(conn, *args) -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_crashing_llamacpp_peer_is_reported_and_the_benchmark_goes_on(tiny_hf_dir, prompt_file, tmp_path,
                                                                         monkeypatch):
    import redrafter.bench as bench
    from redrafter.bench.systems import LlamaCppSystem, PeerCrashed

    with pytest.raises(PeerCrashed, match="loading the model \\(SIGSEGV\\).*GGML_AMX_TILE=OFF"):
        LlamaCppSystem(tmp_path / "x.gguf", 64, 1, [2], 0.0, worker=_segfault_on_load)
    monkeypatch.setattr(bench, "_llamacpp", lambda base, n_ctx, threads, eos, temperature: (
        LlamaCppSystem(tmp_path / "x.gguf", n_ctx, threads, eos, temperature, worker=_segfault_on_first_prompt),
        None))
    rc = main(_bench(tiny_hf_dir, prompt_file, tmp_path, "--max-new-tokens", "4", "--batch-sizes", "1",
                     "--beam-width", "1", "--beam-length", "2", "--peers", "llamacpp"))
    assert rc == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    crash = [n for n in report["notes"] if "llamacpp left the benchmark" in n]
    assert len(crash) == 1 and "SIGSEGV" in crash[0] and "pip install" in crash[0]
    assert {r["label"] for r in report["results"]} == {"plain", "redrafter W1 L2"}
    assert all(r["prompts"] == 3 for r in report["results"])
