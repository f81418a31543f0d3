"""The issue-13 suites (benchmarks/suites.py) and the --base prototype (benchmarks/base_*.py).

Builds the small variants once per session (a few seconds) and checks what the suites are
for: fine-tunes a few percent away from their parent that still need their own weights,
folds sharing one initialisation, and centring on the mean shrinking the retrieval error.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import base_methods as bm
from benchmarks import base_prototype as bp
from benchmarks import suites


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory: pytest.TempPathFactory) -> suites.Suite:
    return suites.build_finetunes(tmp_path_factory.mktemp("finetunes"), small=True)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> suites.Suite:
    return suites.build_ensemble(tmp_path_factory.mktemp("ensemble"), small=True)


def test_finetunes_are_a_few_percent_from_their_parent(finetunes: suites.Suite) -> None:
    states, parent = finetunes.states(), finetunes.base_state()
    assert parent is not None and len(states) == 8
    assert sorted(p.name for p in finetunes.directory.glob("*.safetensors")) == [
        "base.safetensors",
        *(f"ft{k}.safetensors" for k in range(8)),
    ]
    for s in states:
        pooled = math.sqrt(sum(float((s[n] - parent[n]).pow(2).sum()) for n in s))
        relative = pooled / math.sqrt(sum(float(s[n].pow(2).sum()) for n in s))
        assert 0.003 < relative < 0.05
    for name, row in finetunes.report["relative_delta"].items():
        assert row["to_base"] < 0.06, name  # every tensor within a few percent of the parent


def test_each_finetune_needs_its_own_weights(finetunes: suites.Suite) -> None:
    states, parent = finetunes.states(), finetunes.base_state()
    assert parent is not None
    gains_parent, gains_other = [], []
    for k, state in enumerate(states):
        own = suites.evaluate(finetunes, state, k)
        gains_parent.append(own - suites.evaluate(finetunes, parent, k))
        gains_other.append(own - suites.evaluate(finetunes, states[(k + 1) % 8], k))
    assert min(gains_parent) > 0 and sum(gains_parent) / 8 >= 2
    assert sum(gains_other) / 8 >= 2


def test_folds_share_one_initialisation(ensemble: suites.Suite) -> None:
    states = ensemble.states()
    assert len(states) == 5 and len([n for n in states[0] if n.endswith("weight")]) == 6
    torch.manual_seed(0)
    init = ensemble.model().state_dict()
    for name, row in ensemble.report["relative_delta"].items():
        if name != "(all)":  # every fold moved, but less from the folds' mean than from the init
            assert 0 < row["to_mean"] < row["to_base"], name
    assert not torch.equal(states[0]["2.weight"], states[1]["2.weight"])
    assert not torch.equal(states[0]["2.weight"], init["2.weight"])


def test_a_matching_recipe_skips_the_build(finetunes: suites.Suite) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in finetunes.directory.iterdir()}
    again = suites.build_finetunes(finetunes.directory, small=True)
    assert again.paths == finetunes.paths
    assert {p.name: p.stat().st_mtime_ns for p in finetunes.directory.iterdir()} == before
    meta = json.loads((finetunes.directory / "recipe.json").read_text())
    assert meta["hash"] == suites.recipe_hash(suites.config("finetunes", small=True))
    assert suites.recipe_hash(suites.config("finetunes")) != meta["hash"]


def test_a_wider_ensemble_is_its_own_recipe(tmp_path) -> None:
    wide = suites.build("ensemble", tmp_path / "wide", small=True, hidden=40)
    assert wide.states()[0]["2.weight"].shape == (40, 40)
    assert (
        wide.config
        == suites.config("ensemble", small=True, hidden=40)
        != suites.config("ensemble", small=True)
    )
    assert suites.recipe_hash(wide.config) != suites.recipe_hash(suites.config("ensemble", small=True))
    assert suites.default_dir("ensemble", hidden=512).name == "ensemble-h512"
    assert suites.default_dir("ensemble").name == "ensemble"


def test_a_changed_file_is_rebuilt(ensemble: suites.Suite) -> None:
    first = ensemble.paths[0].read_bytes()
    ensemble.paths[0].write_bytes(b"corrupt")
    rebuilt = suites.build_ensemble(ensemble.directory, small=True)
    assert rebuilt.paths[0].read_bytes() == first  # deterministic: the same bytes again


def test_centring_on_the_mean_shrinks_the_retrieval_error(finetunes: suites.Suite) -> None:
    states = finetunes.states()
    bases = bm.centres(states, finetunes.base_state())
    evaluation = bm.Evaluation.of(finetunes, states)
    errors = {}
    for centre in ("none", "mean"):
        plan = bm.uniform_plan(states, centre)
        errors[centre] = bm.averaged([evaluation(bm.retrieve(states, bases, plan, "binary", 0))])
    assert errors["none"]["mean_rel_err"] > 5 * errors["mean"]["mean_rel_err"]
    assert errors["none"]["mean_drop"] > 30
    assert errors["mean"]["mean_drop"] < 10


def test_predicted_error_follows_the_measured_one(finetunes: suites.Suite) -> None:
    states = finetunes.states()
    rows = bp.layer_rows(finetunes, states, bm.centres(states, finetunes.base_state()), range(2))
    assert len(rows) == 3 * 3 * 2  # layers × centres × kinds
    for r in rows:
        assert 0.75 < r["measured"] / r["predicted"] < 1.3, r


def test_retrieve_with_one_context_or_per_context_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(4, 6, generator=gen), "b": torch.randn(4, generator=gen)} for _ in range(3)]
    bases = bm.centres(states, None)
    for kind in bm.KINDS:
        back = bm.retrieve(states, bases, {n: bm.Choice("per_context") for n in states[0]}, kind, 0)
        assert all(torch.equal(b["w"], s["w"]) for b, s in zip(back, states, strict=True))
        (one,) = bm.retrieve(
            states[:1], bm.centres(states[:1], None), bm.uniform_plan(states[:1], "mean"), kind, 0
        )
        torch.testing.assert_close(one["w"], states[0]["w"])


def test_storage_and_pruning_spend_the_same_bytes() -> None:
    gen = torch.Generator().manual_seed(1)
    states = [
        {"w": torch.randn(16, 32, generator=gen), "b": torch.randn(16, generator=gen)} for _ in range(4)
    ]
    plan = bm.uniform_plan(states, "mean")
    # Inputs: 4 × (512 + 16) floats. Stored: base 512 + superposed 512 floats, 4 × 32/8 context
    # bytes, and the bias 4 times.
    stored = (512 + 512 + 4 * 16) * 4 + 4 * 4
    assert bm.storage(states, plan, "binary") == {"ratio": 4 * 528 * 4 / stored}
    pruned = bm.prune_same_bytes(states, bm.centres(states, None), plan, "binary")
    keep = (512 * 4 + 16) // 4 // (4 + 2)  # superposed bytes per context over value + uint16 index
    mean = bm.centres(states, None)["mean"]["w"]
    for p in pruned:
        assert int((p["w"] != mean).sum()) == keep


def test_auto_plan_shares_equal_tensors_and_respects_the_budget() -> None:
    gen = torch.Generator().manual_seed(2)
    shared = torch.randn(8, 64, generator=gen)
    common = torch.randn(8, 64, generator=gen)
    states = [{"s": shared, "w": common + 0.01 * torch.randn(8, 64, generator=gen)} for _ in range(4)]
    bases = bm.centres(states, None)
    loose = bm.auto_plan(states, bases, "binary", budget=10.0)
    assert loose == {"s": bm.Choice("shared"), "w": bm.Choice("superposed", "none")}
    medium = bm.auto_plan(states, bases, "binary", budget=0.5)  # plain would be ~1.4, centred ~0.01
    assert medium["w"] == bm.Choice("superposed", "mean")
    assert bm.auto_plan(states, bases, "binary", budget=1e-4)["w"] == bm.Choice("per_context")


def test_base_superposition_small_uses_the_real_merge(
    finetunes: suites.Suite, tmp_path: pytest.TempPathFactory
) -> None:
    from benchmarks import base_superposition as bs

    result = bs.run_suite(finetunes, tmp_path, sweep=False, tune_steps=0)
    rows = {r["method"]: r for r in result["rows"]}
    default = rows["--base auto (binary)"]
    assert default["mean_drop"] <= 2 and default["worst_drop"] <= 4
    assert default["ratio"] > 2.5  # something is superposed
    assert rows["--base PATH --link-base (binary)"]["ratio"] > rows["--base PATH (binary)"]["ratio"]
    # Centred beats plain: the same tensors superposed without a base lose far more.
    plain = bs.run_merge(
        finetunes, bs.Method("plain", "binary", base="none", max_error=100.0), tmp_path / "p.safetensors"
    )
    states = finetunes.states()
    got = bs.summarise(
        finetunes, bm.Evaluation.of(finetunes, states)(bs.retrieved(tmp_path / "p.safetensors", 8))
    )
    assert plain.storage_ratio > 2.5 and got["mean_drop"] > 10 * max(default["mean_drop"], 0.5)
    assert [name for name, _, _ in bs.targets(result)][:3] == [
        "mean drop ≤ 1 pt",
        "worst drop ≤ 2 pt",
        "storage ≥ 3.5× (base stored)",
    ]
