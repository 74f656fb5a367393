"""The scripts in examples/ run end to end on a tiny model."""
import importlib.util
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adaptive_beam_compares_sessions_by_batch_size_and_checks_outputs(tiny_hf_dir, tmp_path, capsys):
    base, drafter = tiny_hf_dir
    out = tmp_path / "sweep.json"
    assert _example("adaptive_beam").main(["--base", str(base), "--drafter", str(drafter), "--batches", "1,2",
                                           "--max-new-tokens", "6", "--fixed", "1x2,2x3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["system"]) for r in rows] == [
        (b, s) for b in (1, 2) for s in ("plain", "fixed 1x2", "fixed 2x3", "adaptive")]
    assert all(r["identical_to_plain"] and r["tok_per_s"] > 0 for r in rows)
    assert "| batch | plain | fixed 1x2 | fixed 2x3 | adaptive |" in capsys.readouterr().out
