"""`redrafter generate`: streamed text and JSON output, sampling, and clear errors for bad input."""
import json
import subprocess
import sys
import time

import pytest

from redrafter.runtime.config import DecodeConfig
from redrafter.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "redrafter.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("lookup", [[], ["--lookup", "3"], ["--lookup", "3", "--lookup-length", "6"], ["--tree", "search"]],
                         ids=["drafter", "drafter+lookup", "drafter+longer-lookup", "drafter-search-tree"])
def test_generate_json_matches_no_spec(tiny_hf_dir, capsys, lookup):
    base, drafter = tiny_hf_dir
    args = ["generate", "--prompt", "Hello there", "--max-new-tokens", "12", "--base", str(base), "--json"]
    assert main(args + ["--drafter", str(drafter), "--beam-width", "3", "--beam-length", "3", *lookup]) == 0
    spec = json.loads(capsys.readouterr().out)
    looked = "--lookup" in lookup
    assert spec["lookup_ngram"] == (3 if looked else 0) and spec["speculative"]
    assert spec["lookup_length"] == (int(lookup[-1]) if "--lookup-length" in lookup else 3 if looked else 0)
    assert spec["tree"] == ("search" if "--tree" in lookup else "beams")
    assert main(args + ["--no-spec"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert spec["token_ids"] == plain["token_ids"] and spec["text"] == plain["text"]
    assert spec["tokens"] == len(spec["token_ids"]) <= 12
    assert (spec["beam_width"], spec["beam_length"]) == (3, 3) and 1 <= spec["steps"] < spec["tokens"]
    # Steps emit 1..L tokens (the last may emit more than the output keeps).
    assert (spec["tokens"] - 1) / spec["steps"] - 1e-3 <= spec["tokens_per_step"] <= 3
    assert plain["steps"] == plain["tokens"] - 1 and plain["tokens_per_step"] == 1.0


def test_a_lookup_beam_without_a_drafter_is_refused(capsys):
    assert main(["generate", "--prompt", "Hi", "--no-spec", "--lookup", "3"]) == 2
    assert "--no-spec decodes plainly: drop --lookup" in capsys.readouterr().err
    assert main(["generate", "--prompt", "Hi", "--lookup-length", "8"]) == 2
    assert "lookup_length=8 sets the lookup beam's length: give lookup_ngram > 0 (--lookup N) too" \
        in capsys.readouterr().err
    assert main(["generate", "--prompt", "Hi", "--no-spec", "--tree", "search"]) == 2
    assert "--no-spec decodes plainly: drop --tree" in capsys.readouterr().err


def test_sampled_generation_is_the_same_with_and_without_drafting(tiny_hf_dir, capsys):
    """Exact sampling draws token n with the request's n-th seeded uniform from the base
    model's distribution, so drafting changes the steps, not the tokens."""
    base, drafter = tiny_hf_dir
    args = ["generate", "--prompt", "Hello there", "--max-new-tokens", "10", "--base", str(base), "--json",
            "--temperature", "0.9", "--top-p", "0.95"]
    runs = {}
    for name, extra in {"spec": ["--drafter", str(drafter), "--seed", "7"], "plain": ["--no-spec", "--seed", "7"],
                        "other_seed": ["--no-spec", "--seed", "8"]}.items():
        assert main(args + extra) == 0
        runs[name] = json.loads(capsys.readouterr().out)
    assert runs["spec"]["token_ids"] == runs["plain"]["token_ids"] != runs["other_seed"]["token_ids"]
    assert runs["spec"]["temperature"] == 0.9 and runs["spec"]["speculative"]
    assert main(args + ["--no-spec", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_generate_prints_text_and_a_summary_line(tiny_hf_dir):
    base, drafter = tiny_hf_dir
    out = run_cli("generate", "--prompt", "Hi", "--max-new-tokens", "5", "--base", str(base), "--drafter", str(drafter))
    assert out.returncode == 0, out.stderr
    *text, last = out.stdout.strip().splitlines()
    import re

    m = re.fullmatch(r"\[(\d+) tokens, (\d+) steps, ([\d.]+) tokens/step, ([\d.]+) tok/s\]", last)
    assert m, last
    tokens, steps, per_step = int(m[1]), int(m[2]), float(m[3])
    assert 1 <= tokens <= 5 and 1 <= steps < tokens and (tokens - 1) / steps - 1e-3 <= per_step <= 2  # W1 L2
    assert "".join(text).strip()  # the streamed completion came before the summary


def test_bad_paths_give_a_clear_error_not_a_traceback(tmp_path):
    out = run_cli("generate", "--prompt", "Hi", "--base", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("generate", "--prompt", "Hi", "--base", str(tmp_path), "--no-spec")
    assert out.returncode == 2 and "no config.json" in out.stderr


def test_an_interrupted_command_exits_130_saying_how_to_resume(monkeypatch, capsys):
    import redrafter.training.cli as training_cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(training_cli, "run_self_data", interrupted)
    assert main(["self-data", "--output", "answers.jsonl"]) == 130
    assert "interrupted; the answers so far are kept" in capsys.readouterr().err


def test_sigterm_stops_a_command_like_ctrl_c(monkeypatch, capsys):
    """`timeout` sends SIGTERM; a script's background job may ignore SIGINT."""
    import os
    import signal

    import redrafter.training.cli as training_cli

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return 0
    monkeypatch.setattr(training_cli, "run_self_data", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["self-data", "--output", "answers.jsonl"]) == 130
    assert "interrupted; the answers so far are kept" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_counts_below_one_are_refused_naming_the_flag(capsys):
    for flag, least in (("--beam-width", 1), ("--beam-length", 1), ("--max-new-tokens", 1), ("--max-seq-len", 1),
                        ("--lookup", 0), ("--lookup-length", 0)):
        with pytest.raises(SystemExit) as stop:
            main(["generate", "--prompt", "Hi", flag, str(least - 1)])
        assert stop.value.code == 2
        assert f"argument {flag}: must be >= {least}, got {least - 1}" in capsys.readouterr().err


def test_generate_runs_an_engine_with_the_tokens_of_its_base_model(tiny_hf_dir, tmp_path, capsys):
    from redrafter.builder.build import BuildOptions, build_engine

    base, drafter = tiny_hf_dir
    engine = build_engine(BuildOptions(output=tmp_path / "e", base=base, drafter=drafter, backend="eager", max_seq_len=128, progress=False, decode=DecodeConfig(beam_width=2, beam_length=3)))
    args = ["generate", "--prompt", "Hello there", "--max-new-tokens", "10", "--json"]
    assert main(args + ["--engine", str(engine)]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert main(args + ["--base", str(base), "--no-spec"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert spec["token_ids"] == plain["token_ids"] and spec["text"] == plain["text"]
    assert spec["speculative"] and (spec["beam_width"], spec["beam_length"]) == (2, 3)
    # The engine's own plain decoding, and a setting within its W2 L3, give the same tokens.
    assert main(args + ["--engine", str(engine), "--no-spec"]) == 0
    engine_plain = json.loads(capsys.readouterr().out)
    assert engine_plain["token_ids"] == plain["token_ids"] and not engine_plain["speculative"]
    assert engine_plain["steps"] == len(plain["token_ids"]) - 1
    assert main(args + ["--engine", str(engine), "--beam-width", "1", "--tree", "search"]) == 0
    within = json.loads(capsys.readouterr().out)
    assert within["token_ids"] == plain["token_ids"] and within["speculative"]
    assert (within["beam_width"], within["beam_length"], within["tree"]) == (1, 3, "search")
    assert main(args + ["--engine", str(engine), "--beam-width", "4"]) == 2
    assert "W4 L3 (12 tree tokens) exceeds this engine" in capsys.readouterr().err
    assert main(args + ["--engine", str(engine), "--lookup", "2"]) == 2
    assert "was built without a lookup beam: drop --lookup, or rebuild with --lookup N" in capsys.readouterr().err
    assert main(args + ["--engine", str(engine), "--base", str(base), "--max-seq-len", "64"]) == 2
    assert "--engine fixes the base model, drafter and max_seq_len it was built with: drop --base, --max-seq-len" \
        in capsys.readouterr().err
