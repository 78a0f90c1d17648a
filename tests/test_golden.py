"""Golden numbers: for fixed seeds, each tiny family and structure kind prunes to the same shapes,
parameter counts and weights as when ``tests/golden/prune.json`` was written.

A refactor of the pruning core (issue 11) must leave them unchanged; a deliberate change of
behaviour rewrites them with ``python tests/test_golden.py`` and says why in its commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, tiny_model

from llmp import LlmpError, PruneConfig, prune

GOLDEN = Path(__file__).parent / "golden" / "prune.json"
SETTINGS = {
    "mlp-taylor": dict(ratio=0.2, criterion="taylor"),
    "query-taylor": dict(ratio=0.08, attention="query", mlp=False, layers="0:4", criterion="taylor"),
    "kv-l2": dict(ratio=0.25, attention="kv", criterion="l2", layers="0:4"),
    "channel-taylor": dict(ratio=0.1, scope="channel", criterion="taylor"),
    "layer-taylor": dict(ratio=0.2, scope="layer", layers="0:4", criterion="taylor"),
    "mlp-flap-lstsq": dict(ratio=0.2),  # the defaults: flap, lstsq refit, layer by layer
    "global-vectorwise": dict(ratio=0.2, attention="kv", ranking="global", criterion="vectorwise", round_to=4),
}


def summary(params_before: int, params_after: int, layer_shapes: list, model) -> dict:
    """Counts, shapes, and two sums over every weight of ``model``."""
    with torch.no_grad():
        weights = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return {
        "params_before": params_before,
        "params_after": params_after,
        "layer_shapes": layer_shapes,
        "sum": float(weights.sum()),
        "sum_squares": float((weights**2).sum()),
    }


def digest(name: str, setting: str) -> dict:
    """What pruning ``name`` with ``setting`` gives (see :func:`summary`)."""
    torch.manual_seed(0)
    model = tiny_model(name)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    try:
        record = prune(model, PruneConfig(**SETTINGS[setting]), calib)
    except LlmpError as err:  # a refusal is pinned too (MQA has no KV group to remove)
        return {"error": str(err)}
    return summary(record.params_before, record.params_after, record.layer_shapes, model)


def cli_digest(folder: Path) -> dict:
    """``llmp prune`` with its defaults on the tiny model folder: the saved record's counts and the weights."""
    from llmp.cli import main
    from llmp.io import load_pruned

    assert main(["prune", "--model", str(folder), "--output", str(folder.parent / "out"), "--samples", "0"]) == 0
    report = json.loads((folder.parent / "out" / "pruning_report.json").read_text())
    model = load_pruned(folder.parent / "out")
    return summary(report["params_before"], report["params_after"], report["layer_shapes"], model)


def assert_matches(found: dict, golden: dict) -> None:
    if "error" in golden or "error" in found:
        assert found == golden
        return
    exact = ("params_before", "params_after", "layer_shapes")
    assert {k: found[k] for k in exact} == {k: golden[k] for k in exact}
    assert found["sum"] == pytest.approx(golden["sum"], rel=1e-6, abs=1e-6)
    assert found["sum_squares"] == pytest.approx(golden["sum_squares"], rel=1e-6)


def test_default_cli_run_matches_the_golden_numbers(tmp_path, one_thread):
    from helpers import make_tiny_folder

    assert_matches(cli_digest(make_tiny_folder(tmp_path / "tiny")), json.loads(GOLDEN.read_text())["cli/default"])


CASES = [(name, setting) for name in sorted(TINY) for setting in SETTINGS]


@pytest.mark.parametrize(("name", "setting"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_pruning_matches_the_golden_numbers(name, setting, one_thread):
    assert_matches(digest(name, setting), json.loads(GOLDEN.read_text())[f"{name}/{setting}"])


if __name__ == "__main__":  # rewrite the golden file (one thread, as the test runs)
    torch.set_num_threads(1)
    GOLDEN.parent.mkdir(exist_ok=True)
    import tempfile

    from helpers import make_tiny_folder

    numbers = {f"{n}/{s}": digest(n, s) for n, s in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        numbers["cli/default"] = cli_digest(make_tiny_folder(Path(tmp) / "tiny"))
    GOLDEN.write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(numbers)} cases to {GOLDEN}", file=sys.stderr)
