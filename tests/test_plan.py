"""Planning: the requested share of parameters goes, under the constraints."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmp import LlmpError, PruneConfig, prune
from llmp.pruning import parse_range


def medium_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attention", ["query", "kv", "none"])
@pytest.mark.parametrize("ranking", ["layer", "global"])
def test_achieved_ratio_is_on_target(attention, ranking):
    model = medium_model()
    calib = torch.randint(0, 512, (4, 32))
    report = prune(model, PruneConfig(ratio=0.2, attention=attention, ranking=ranking, layers="0:6"), calib)
    assert abs(report.achieved_ratio - 0.2) <= 0.01


def test_rounding_and_min_keep():
    model = medium_model()
    report = prune(
        model, PruneConfig(ratio=0.25, round_to=64, min_keep=0.5, layers="0:6"), torch.randint(0, 512, (4, 32))
    )
    assert all(s["mlp"] % 64 == 0 and s["mlp"] >= 344 for s in report.layer_shapes)
    assert abs(report.achieved_ratio - 0.25) <= 0.02


def test_layer_range_is_respected():
    model = medium_model()
    report = prune(model, PruneConfig(ratio=0.1, attention="query", layers="2:4"), torch.randint(0, 512, (4, 32)))
    shapes = report.layer_shapes
    assert [s["mlp"] for s in shapes[:2] + shapes[4:]] == [688] * 4
    assert all(s["mlp"] < 688 for s in shapes[2:4])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(ratio=1.5), "`ratio` must be between 0 and 1"),
        (dict(ratio=0.2, layers="4:40"), "goes beyond the model, which has 6 layers"),
        (dict(ratio=0.2, layers="5:2"), "must look like A:B"),
        (dict(ratio=0.2, criterion="magic"), "`criterion` must be one of"),
        (dict(ratio=0.9, attention="kv", mlp=False), "cannot remove"),
        (dict(ratio=0.2, layout="uniform", layers="1:3"), "uniform prunes every layer"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(LlmpError, match=message):
        prune(medium_model(), PruneConfig(**kwargs), torch.randint(0, 512, (2, 16)))


def test_missing_calibration_is_a_clear_error():
    for criterion in ("taylor", None):  # None: the default, flap here
        with pytest.raises(LlmpError, match="calibration tokens and `calibration` is empty"):
            prune(medium_model(), PruneConfig(ratio=0.2, criterion=criterion), None)


def test_unsupported_architecture():
    """OLMo-2 normalises q over all heads at once: no adapter, and discovery refuses its heads."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    config = Olmo2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    )
    with pytest.raises(LlmpError, match="unsupported architecture `olmo2`.*supported model types: baichuan"):
        prune(Olmo2ForCausalLM(config), PruneConfig(ratio=0.2, attention="query", criterion="l1"))


def test_parse_range():
    assert parse_range("4:30", 32) == range(4, 30)
    assert parse_range(":3", 8) == range(0, 3)
    assert parse_range("5:", 8) == range(5, 8)


def test_reference_params_makes_the_ratio_a_fraction_of_the_original(calib):
    from helpers import tiny_model

    from llmp.pruning import count_parameters

    model = tiny_model("llama-gqa")
    original = count_parameters(model)
    prune(model, PruneConfig(ratio=0.1, layers="0:4"), calib)
    report = prune(model, PruneConfig(ratio=0.3, layers="0:4"), calib, reference_params=original)
    assert 1 - count_parameters(model) / original == pytest.approx(0.3, abs=0.01)
    assert report.params_after == count_parameters(model)
