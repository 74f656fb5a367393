"""Linear tactics (runtime.tactics): the row-invariance gate, the choice of the faster candidate,
the per-machine cache, export with a symbolic row count. Nothing here times anything real: the
timer is a fake clock that the candidates themselves advance."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import tiny_llama
from redrafter.runtime import tactics as T
from redrafter.runtime.model import causal_mask, rows_linear


class Clock:
    """A fake clock: candidates advance it by their declared cost; the timer reads it."""

    def __init__(self):
        self.now = 0.0

    def timer(self, fn) -> float:
        start = self.now
        fn()
        return self.now - start


def _alone_costing(clock: Clock, name: str, cost: float) -> T.Tactic:
    """A row-invariant candidate (each row on its own) that costs `cost` fake seconds per call."""
    def run(layer: nn.Module, x: Tensor) -> Tensor:
        clock.now += cost
        return torch.cat([layer(x[j:j + 1]) for j in range(x.shape[0])])
    return T.Tactic(name, run, T.ANY)


def _row_variant(layer: nn.Module, x: Tensor) -> Tensor:
    """Close to layer(x), but with more than one row every result moves to the next float up:
    by construction a row's bits depend on how many rows come with it."""
    y = layer(x)
    return y if x.shape[0] == 1 else torch.nextafter(y, torch.full_like(y, float("inf")))


VARIANT = T.Tactic("row-variant", _row_variant, T.ANY)


@pytest.mark.parametrize("slow_first", [True, False], ids=["slow-first", "slow-second"])
def test_tuning_keeps_the_faster_of_two_candidates_and_records_the_timings(slow_first):
    clock = Clock()
    slow, fast = _alone_costing(clock, "slow", 5.0), _alone_costing(clock, "fast", 1.0)
    layers = [nn.Linear(32, 16) for _ in range(3)]
    plan = T.tune_shape(layers, [1, 2, 4], candidates=[slow, fast] if slow_first else [fast, slow],
                        timer=clock.timer, reps=3, flags=())
    # Neither is export-safe: compiled programs fall back to x@W.T, and the plan says so.
    assert plan.tactics == ["fast"] * 3 and plan.compiled == "x@W.T"
    # Timed over all three layers of the shape: 3 calls per timing.
    assert plan.ms == {str(b): {"slow": 15e3, "fast": 3e3} for b in (1, 2, 4)}
    assert plan.layers == 3 and list(plan.rejected) == ["(compiled)"]
    bound = plan.bind({"fast": fast, "slow": slow, "x@W.T": T.BY_NAME["x@W.T"]})
    assert [bound.for_rows(m).name for m in (1, 2, 3, 4)] == ["fast"] * 4 and bound.for_rows(5) is None


def test_the_gate_rejects_a_row_variant_candidate_even_when_it_is_fastest():
    clock = Clock()
    safe = _alone_costing(clock, "safe", 5.0)

    def variant(layer, x):  # the fastest, and close to the float64 product
        clock.now += 1.0
        return _row_variant(layer, x)

    layer = nn.Linear(48, 24)
    verdict = T.gate(variant, layer, [1, 2, 3])
    assert not verdict.admitted and "row-variant" in verdict.reason
    plan = T.tune_shape([layer], [1, 3], candidates=[T.Tactic("variant", variant, T.ANY), safe],
                        timer=clock.timer, reps=2, flags=())
    assert plan.tactics == ["safe", "safe"] and "row-variant" in plan.rejected["variant"]


def test_the_gate_rejects_a_wrong_product():
    layer = nn.Linear(48, 24)
    verdict = T.gate(lambda lin, x: F.linear(x, lin.weight.t().t() * 1.01, lin.bias), layer, [1, 2])
    assert not verdict.admitted and "float64" in verdict.reason


def _verify_and_alone(model, prompt: Tensor, path: list[int]) -> tuple[Tensor, Tensor]:
    """Hidden states of `path` verified at once after the prompt, and decoded one token at a time."""
    zero = torch.zeros(1, dtype=torch.long)
    n = prompt.shape[1]

    def prefilled():
        cache = model.new_cache(1, n + len(path) + 1)
        model(prompt, torch.arange(n)[None], cache, zero, zero, causal_mask(1, n))
        return cache

    at_once = model(torch.tensor([path]), torch.arange(n, n + len(path))[None], prefilled(), zero,
                    torch.tensor([n]), causal_mask(1, len(path)))[0]
    cache, alone = prefilled(), []
    for i, tok in enumerate(path):
        alone.append(model(torch.tensor([[tok]]), torch.tensor([[n + i]]), cache, zero, torch.tensor([n + i]),
                           causal_mask(1, 1))[0, 0])
    return at_once, torch.stack(alone)


def test_a_gated_plan_gives_verified_tokens_the_bits_they_get_decoded_alone():
    """With exact (float64) attention, the linears alone decide whether a verification of T tokens
    computes what decoding them one by one does: bitwise, with the gated plan on any CPU; not
    with the row-variant candidate forced in."""
    model = tiny_llama(vocab=96).exact_attention()
    prompt, path = torch.randint(0, 96, (1, 9)), [5, 17, 33, 2]
    with torch.inference_mode():
        plan = T.plan_for(model, max_rows=4, how="gate", use_cache=False)
        T.apply_plan(plan, model)
        at_once, alone = _verify_and_alone(model, prompt, path)
        assert torch.equal(at_once, alone)
        forced = T.Plan(plan.signature, "forced", {k: T.ShapePlan([4], ["row-variant"], "x@W.T")
                                                   for k in plan.shapes})
        for key, layers in T.linear_groups(model).items():
            for layer in layers:
                layer.tactics = forced.shapes[key].bind({"row-variant": VARIANT, "x@W.T": T.BY_NAME["x@W.T"]})
        at_once, alone = _verify_and_alone(model, prompt, path)
        assert not torch.equal(at_once, alone)


def test_rows_linear_runs_the_bucket_tactic_and_layer_x_beyond_the_plan():
    layer = nn.Linear(16, 8)
    x = torch.randn(1, 9, 16)
    assert torch.equal(rows_linear(layer, x), layer(x))  # no plan
    calls = []

    def tagged(name):
        def run(lin, rows):
            calls.append((name, rows.shape[0]))
            return lin(rows)
        return T.Tactic(name, run)

    layer.tactics = T.ShapePlan([1, 4], ["one", "few"], "one").bind({"one": tagged("one"), "few": tagged("few")})
    for m in (1, 3, 4, 5):
        out = rows_linear(layer, x[:, :m])
        assert out.shape == (1, m, 8)
        torch.testing.assert_close(out, layer(x[:, :m]))
    assert calls == [("one", 1), ("few", 3), ("few", 4)]  # 5 rows: beyond the plan, layer(x)


@pytest.mark.parametrize("name", [t.name for t in T.CANDIDATES if t.export_safe])
def test_export_safe_tactics_export_with_a_symbolic_row_count(name):
    from torch.export import Dim

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 8)
            self.lin.tactics = T.ShapePlan([64], [name], name).bind()

        def forward(self, x):  # split into heads, as attention does
            return rows_linear(self.lin, x).view(x.shape[0], x.shape[1], 2, 4)

    m = M()
    # [B, T, H] with a symbolic T, as the engine's forward program takes it
    dims = {0: Dim("b", min=1, max=8), 1: Dim("rows", min=1, max=64)}
    program = torch.export.export(m, (torch.randn(2, 6, 16),), dynamic_shapes=(dims,), strict=False)
    for rows in (1, 2, 3, 6, 9):
        x = torch.randn(2, rows, 16)
        torch.testing.assert_close(program.module()(x), T.BY_NAME[name](m.lin, x.reshape(-1, 16)).view(2, rows, 2, 4))


def test_the_plan_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(T.CACHE_ENV, str(tmp_path))
    tuned = []
    real = T.tune_shape
    monkeypatch.setattr(T, "tune_shape", lambda layers, buckets, **kw: tuned.append(len(layers)) or real(
        layers, buckets, **kw))
    model = tiny_llama()
    first = T.plan_for(model, max_rows=4, tree_sizes=[3], how="gate")
    n = len(tuned)
    assert n == len(T.linear_groups(model)) >= 4
    files = list((tmp_path / "tactics").iterdir())
    assert [f.name for f in files] == [f"{T.signature_id(T.machine_signature())}.json"]
    again = T.plan_for(model, max_rows=4, tree_sizes=[3], how="gate")
    assert len(tuned) == n and again.to_json() == first.to_json()  # from the cache
    assert first.shapes[next(iter(first.shapes))].buckets == [1, 2, 3, 4]
    files[0].write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable tactic cache"):
        T.plan_for(model, max_rows=4, tree_sizes=[3], how="gate")
    assert len(tuned) == 2 * n and json.loads(files[0].read_text())["signature"] == T.machine_signature()


def test_a_forced_tactic_name_must_exist():
    with pytest.raises(ValueError, match="not a tactic"):
        T.plan_for(tiny_llama(), max_rows=2, how="no-such-tactic")
