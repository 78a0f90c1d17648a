"""Allocation (``llmp.allocation``): how many elements each layer loses. Budgets met, counts
deployable under every ``--target``, the search reproducible and better than its seed on its own
fitness, and its choice applied by the same layer-by-layer pass as any other allocation."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import logits, tiny_model

from llmp import LlmpError, PruneConfig, prune
from llmp.allocation import SearchSettings, allocate
from llmp.allocation.evolution import DenseKL, _Space
from llmp.allocation.rules import line_weights
from llmp.plan import PlanSettings, groups_element_parameters, layer_counts
from llmp.pruning import replay
from llmp.record import PruningRecord
from llmp.structure import adapter_for

RATIO = 0.4


def model() -> torch.nn.Module:
    """Six layers, GQA 8/2, 384 MLP channels: room for allocations to differ."""
    return tiny_model(
        "llama-gqa", layers=6, vocab_size=256, hidden_size=128, intermediate_size=384, num_attention_heads=8
    )


def calibration(n: int = 8, length: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(1))


def config(**kwargs) -> PruneConfig:
    settings = dict(ratio=RATIO, attention="query", search_generations=3, search_seconds=300.0)
    return PruneConfig(**{**settings, **kwargs})


def kept_mlp(record: PruningRecord) -> list[int]:
    return [s["mlp"] for s in record.layer_shapes]


@pytest.mark.parametrize(
    ("rule", "attention"),
    [("uniform", "query"), ("depth", "query"), ("sensitivity", "query"), ("search", "query"), ("search", "kv")],
)
def test_every_allocation_meets_the_budget(rule, attention):
    """Query heads within their KV groups, or whole KV groups (``--attention kv``), against MLP channels."""
    record = prune(model(), config(allocation=rule, attention=attention), calibration())
    removed = record.params_before - record.params_after
    step = 4 * 3 * 128  # the plan's finest step: one MLP channel (gate, up, down) in each of 4 layers
    assert abs(removed - round(RATIO * record.params_before)) <= step
    assert record.steps[0].allocation.rule == rule


def test_closed_forms_move_the_budget_between_layers():
    uniform = kept_mlp(prune(model(), config(allocation="uniform"), calibration()))
    depth = kept_mlp(prune(model(), config(allocation="depth"), calibration()))
    assert len(set(uniform[1:-1])) == 1 and len(set(depth[1:-1])) > 1
    assert depth[1] > depth[-2]  # deeper layers lose more


def test_line_weights_average_one_and_span_the_spread():
    weights = line_weights([3, 1, 2, 0], spread=0.5)
    assert weights[3] == 1.5 and weights[0] == 0.5 and sum(weights.values()) == pytest.approx(4.0)


@pytest.mark.parametrize(("target", "align"), [("gguf", 32), ("vllm", 64)])
@pytest.mark.parametrize("rule", ["sensitivity", "search"])
def test_counts_stay_deployable_under_each_target(target, align, rule):
    attention = "none" if target == "vllm" else "query"
    record = prune(model(), config(allocation=rule, target=target, attention=attention), calibration())
    assert all(m % align == 0 for m in kept_mlp(record))
    if target == "vllm":
        assert {s["heads"] for s in record.layer_shapes} == {8}


def test_the_search_is_reproducible_and_better_than_its_seed_on_its_own_fitness():
    first = prune(model(), config(allocation="search", search_generations=4), calibration())
    again = prune(model(), config(allocation="search", search_generations=4), calibration())
    found = first.steps[0].allocation
    assert found.counts == again.steps[0].allocation.counts and kept_mlp(first) == kept_mlp(again)
    assert found.generations == 4 and len(found.fitness) == 4
    assert all(b <= a for a, b in zip(found.fitness, found.fitness[1:], strict=False))  # never rises
    assert found.fitness[-1] < found.seed_fitness  # a tiny random model has room to gain
    uniform = prune(model(), config(allocation="uniform"), calibration())
    assert found.counts != uniform.steps[0].allocation.counts


def test_the_search_leaves_the_model_as_it_found_it():
    dense, calib = model(), calibration()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    config_before = dense.config.to_dict()
    part = adapter_for(dense).discover(dense, config().kinds)
    params = groups_element_parameters(part.groups, dense)
    target = round(0.3 * sum(p.numel() for p in dense.parameters()))
    resolved = config(allocation="search").resolved(dense)
    chosen = allocate(dense, part, params, target, resolved, calib, search_settings=SearchSettings(generations=2))
    assert chosen.search.generations == 2
    after = dense.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert dense.config.to_dict() == config_before


def test_statistics_spilled_to_disk_give_the_same_search(monkeypatch, tmp_path):
    """Past ``stats_bytes`` the Grams are read back by memory map: the same counts, the same fitness,
    and the temporary folder gone afterwards."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # TMPDIR is read again
    dense, calib = model(), calibration()
    part = adapter_for(dense).discover(dense, config().kinds)
    params = groups_element_parameters(part.groups, dense)
    target = round(0.3 * sum(p.numel() for p in dense.parameters()))
    resolved = config(allocation="search").resolved(dense)
    runs = [
        allocate(
            dense, part, params, target, resolved, calib, search_settings=SearchSettings(generations=2, stats_bytes=b)
        )
        for b in (1 << 30, 0)
    ]
    assert runs[0].counts == runs[1].counts and runs[0].search.fitness == runs[1].search.fitness
    assert list(tmp_path.iterdir()) == []


def test_a_searched_plan_replays_to_the_same_model():
    calib = calibration()
    pruned = model()
    record = prune(pruned, config(allocation="search", compensate="none"), calib)  # replay repeats no refit
    again = model()
    replay(again, record.steps)
    ids = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(logits(again, ids), logits(pruned, ids), rtol=0, atol=1e-5)
    assert PruningRecord.from_json(record.to_json()).steps[0].allocation == record.steps[0].allocation


def test_a_move_keeps_the_budget_and_the_steps():
    dense = model()
    part = adapter_for(dense).discover(dense, config().kinds)
    params = groups_element_parameters(part.groups, dense)
    target = round(0.3 * sum(p.numel() for p in dense.parameters()))
    cfg = config(round_to=32)
    space = _Space(part.groups, params, cfg, target)
    counts = layer_counts(part.groups, params, target, PlanSettings("layer", 0.0, 32))
    counts = {g.name: counts.get(g.name, 0) for g in part.groups}
    import random

    rng = random.Random(0)
    base = abs(space.removed(counts) - target)
    for _ in range(50):
        counts = space.mutate(counts, rng)
        assert all(space.valid(n, k) for n, k in counts.items())
        assert abs(space.removed(counts) - target) <= max(base, 32 * 3 * 128)


def test_fitness_is_zero_for_the_dense_model_itself():
    dense = model()
    assert DenseKL(dense, calibration(), 16)(4) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(allocation="search", ranking="global"), "use `ranking` layer"),
        (dict(allocation="depth", layout="uniform"), "uniform layout"),
        (dict(allocation="sensitivity", scope="channel", attention="none"), "use `scope` block"),
        (dict(allocation="search", criterion="taylor"), "activation criterion"),
        (dict(allocation="search", steps=2), "activation criterion"),
        (dict(search_seconds=0), "`search_seconds` must be > 0"),
        (dict(search_generations=0), "`search_generations` must be >= 1"),
        (dict(allocation="best"), "`allocation` must be one of"),
    ],
)
def test_allocation_settings_are_checked(kwargs, message):
    with pytest.raises(LlmpError, match=message):
        PruneConfig(**kwargs)


def test_a_streamed_run_says_it_cannot_search(tmp_path, caplog):
    from llmp.pruning import prune_streamed

    dense = model()
    dense.save_pretrained(tmp_path / "dense")
    in_memory = prune(model(), config(allocation="uniform"), calibration())
    with caplog.at_level(logging.WARNING):
        streamed = prune_streamed(tmp_path / "dense", tmp_path / "out", config(allocation="search"), calibration())
    assert "cannot search the allocation" in caplog.text
    assert streamed.steps[0].plan == in_memory.steps[0].plan


def test_the_report_shows_the_search(tmp_path):
    from llmp import save_pruned
    from llmp.report import write_report

    pruned = model()
    record = prune(pruned, config(allocation="search"), calibration())
    save_pruned(pruned, tmp_path / "out", None, record)
    md, png = write_report(tmp_path / "out")
    found = record.steps[0].allocation
    assert f"in {found.generations} generations" in md.read_text() and png.stat().st_size > 0


def test_the_cli_refuses_a_search_with_one_sample_before_loading(tmp_path, capsys):
    from helpers import run_cli

    code, _, err = run_cli(
        capsys,
        "prune",
        "--model",
        tmp_path / "nowhere",
        "--allocation",
        "search",
        "--num-samples",
        "1",
        "--output",
        tmp_path / "out",
    )
    assert code == 2 and "`--num-samples` must be at least 2" in err
