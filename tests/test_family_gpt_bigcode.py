"""GPT-BigCode (StarCoder): the adapter of the guide in docs/adapters.md, and the guide's own code.

Multi-query ``c_attn`` [q0 .. q3 | k | v] and the multi-head [q k v per head] layout; hidden
channels are refused (LayerNorm).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from family_checks import TOKENS, check_prune_save_load, check_pruned_equals_masked, randomized
from helpers import prune_and_mask
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

from llmp import LlmpError, PruneConfig, prune
from llmp.structure import Kind, adapter_for
from llmp.structure import adapters as registry

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "adapters.md"
KINDS = [Kind.QUERY_HEADS, Kind.KV_GROUPS, Kind.MLP, Kind.LAYERS]


def tiny_bigcode(multi_query: bool = True) -> GPTBigCodeForCausalLM:
    """4 heads of 16 over hidden 64; StarCoder's multi-query layout unless ``multi_query`` is off."""
    config = GPTBigCodeConfig(
        n_embd=64, n_layer=4, n_head=4, n_inner=96, n_positions=64, vocab_size=128, multi_query=multi_query, **TOKENS
    )
    torch.manual_seed(0)
    return randomized(GPTBigCodeForCausalLM(config))


@pytest.mark.parametrize("multi_query", [True, False], ids=["mqa", "mha"])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_pruned_equals_masked(kind, multi_query, calib, inputs):
    model = tiny_bigcode(multi_query)
    assert adapter_for(model).family == "gpt_bigcode"
    if multi_query and kind is Kind.KV_GROUPS:
        _, _, plan = prune_and_mask(model, (kind,), calib=calib)
        assert not plan  # one KV head: removing the KV group would remove every head
        return
    check_pruned_equals_masked(model, kind, calib, inputs)


def test_hidden_channels_are_refused(calib):
    with pytest.raises(LlmpError, match="not supported for gpt_bigcode: its LayerNorm"):
        prune(tiny_bigcode(), PruneConfig(ratio=0.1, scope="channel"), calib)


@pytest.mark.parametrize(
    ("multi_query", "config"),
    [
        (True, PruneConfig(ratio=0.2, attention="query")),
        (True, PruneConfig(ratio=0.25, scope="layer")),
        (False, PruneConfig(ratio=0.2, attention="kv", steps=2)),
    ],
    ids=["mqa-query+mlp", "mqa-layers", "mha-kv+mlp-iterative"],
)
def test_prune_save_load(multi_query, config, calib, inputs, tmp_path):
    report = check_prune_save_load(tiny_bigcode(multi_query), config, calib, inputs, tmp_path)
    assert report.family == "gpt_bigcode"


# -- the guide: its code is the shipped adapter and tests that run -----------------------------
def guide_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_guide_shows_the_shipped_adapter():
    """The guide's adapter listing is the file llmp ships, character for character."""
    shipped = (ROOT / "llmp/structure/adapters/gpt_bigcode.py").read_text()
    listings = [b for b in guide_blocks() if b.startswith("# llmp/structure/adapters/gpt_bigcode.py\n")]
    assert len(listings) == 1
    assert listings[0].partition("\n")[2] == shipped


def test_guide_code_runs(monkeypatch, calib, inputs, tmp_path):
    """Every other Python block of the guide runs, in order; the test functions it defines pass."""
    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry._ADAPTERS))  # the guide registers adapters
    namespace: dict = {"__name__": "guide"}
    for block in guide_blocks():
        if not block.startswith("# llmp/structure/adapters/gpt_bigcode.py\n"):
            exec(compile(block, str(GUIDE), "exec"), namespace)
    tests = {name: f for name, f in namespace.items() if name.startswith("test_") and callable(f)}
    assert tests, "the guide shows no test"
    for kind in (Kind.QUERY_HEADS, Kind.MLP, Kind.LAYERS):
        tests["test_pruned_equals_masked"](kind, calib, inputs)
    tests["test_prune_save_load"](calib, inputs, tmp_path)
