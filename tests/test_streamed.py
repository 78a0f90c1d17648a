"""Layer-by-layer pruning (llmp.pruning.layerwise) and its streamed form (llmp.pruning.streamed) against the
in-memory paths: the same plans and the same weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import logits, tiny_model

from llmp import LlmpError, PruneConfig, load_pruned, prune
from llmp.pruning import RunInput
from llmp.pruning.streamed import INDEX, prune_streamed
from llmp.record import Calibration
from llmp.structure import adapter_for


def _config(**kw):
    return PruneConfig(**{"ratio": 0.2, "attention": "kv", "criterion": "flap", "layerwise": True, **kw})


def test_global_ranking_plans_as_one_shot(calib):
    """Global ranking scores every layer on the dense activations: the plan of one forward."""
    model = tiny_model("llama-gqa")
    one_shot = prune(copy.deepcopy(model), _config(ranking="global", layerwise=False), calib)
    layerwise = prune(model, _config(ranking="global"), calib)
    assert layerwise.steps[0].plan == one_shot.steps[0].plan


def test_first_layer_sees_the_dense_inputs(calib):
    """Layer by layer, the first pruned layer is scored on the same inputs as in one shot, and
    later layers on the pruned model's; the counts per group are the same either way."""
    model = tiny_model("llama-gqa", layers=6)
    one_shot = prune(copy.deepcopy(model), _config(layerwise=False, compensate="bias"), calib).steps[0].plan
    layerwise = prune(model, _config(compensate="bias"), calib).steps[0].plan
    assert {k: len(v) for k, v in layerwise.items()} == {k: len(v) for k, v in one_shot.items()}
    first = min(one_shot, key=lambda name: int(name.split(".")[1]))
    assert layerwise[first] == one_shot[first]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("compensate", ["none", "bias", "lstsq"])
@pytest.mark.parametrize("ranking", ["layer", "global"])
def test_streamed_equals_in_memory(calib, inputs, tmp_path, dtype, compensate, ranking):
    source = tmp_path / "source"
    tiny_model("llama-gqa").to(dtype).save_pretrained(source)
    in_memory = load_pruned(source)
    config = _config(compensate=compensate, ranking=ranking)
    expected = prune(in_memory, config, calib)
    record = prune_streamed(source, tmp_path / "out", config, calib)
    assert record.steps[0].plan == expected.steps[0].plan
    assert record.params_after == expected.params_after
    streamed = load_pruned(tmp_path / "out")
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(streamed.state_dict()[name], tensor), name
    assert {p.dtype for p in streamed.parameters()} == {dtype}
    torch.testing.assert_close(logits(streamed, inputs), logits(in_memory, inputs), rtol=0, atol=0)


def test_streamed_folder_is_sharded_by_layer(calib, tmp_path):
    source = tmp_path / "source"
    tiny_model("llama-gqa").save_pretrained(source)
    given = RunInput("tiny", Calibration("c4", len(calib), calib.shape[1]))
    record = prune_streamed(source, tmp_path / "out", _config(compensate="bias"), calib, given=given)
    out = tmp_path / "out"
    index = json.loads((out / INDEX).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]
    assert set(index["weight_map"].values()) == set(shards)
    assert index["weight_map"]["model.layers.2.mlp.down_proj.weight"] == "model-00003-of-00005.safetensors"
    assert index["weight_map"]["model.embed_tokens.weight"] == "model-00005-of-00005.safetensors"
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["model"] == "tiny" and report["params_after"] == record.params_after
    assert report["calibration"] == {"source": "c4", "num_samples": len(calib), "seq_len": calib.shape[1]}
    dense = tiny_model("llama-gqa")
    assert report["dense_layer_shapes"] == adapter_for(dense).layer_shapes(dense)  # as the in-memory path records
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no leftovers


def test_a_pruned_folder_streams_again(calib, inputs, tmp_path):
    """A folder llmp pruned (its own per-layer counts, biases) is shaped from its headers."""
    first = tmp_path / "first"
    tiny_model("llama-gqa").save_pretrained(tmp_path / "source")
    prune_streamed(tmp_path / "source", first, _config(compensate="bias"), calib)
    again = load_pruned(first)
    expected = prune(again, _config(ratio=0.1, attention="none", compensate="bias"), calib)
    record = prune_streamed(first, tmp_path / "second", _config(ratio=0.1, attention="none", compensate="bias"), calib)
    assert record.steps[0].plan == expected.steps[0].plan
    torch.testing.assert_close(logits(load_pruned(tmp_path / "second"), inputs), logits(again, inputs), rtol=0, atol=0)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(criterion="taylor"), "`layerwise` scores each layer from its activations"),
        (dict(steps=2), "`layerwise` prunes in one pass"),
        (dict(scope="layer"), "scores heads and MLP channels only"),
    ],
)
def test_layerwise_settings_are_checked(settings, message):
    with pytest.raises(LlmpError, match=message):
        _config(**settings)


def test_streaming_refuses_what_is_not_a_folder(tmp_path, calib):
    with pytest.raises(LlmpError, match="config.json is missing"):
        prune_streamed(tmp_path, tmp_path / "out", _config(), calib)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_on_cuda_equals_cpu(calib, tmp_path):
    """One layer on the GPU at a time, computed in the model's dtype there: the same plan as on CPU."""
    source = tmp_path / "source"
    tiny_model("llama-gqa").save_pretrained(source)
    on_cpu = prune_streamed(source, tmp_path / "cpu", _config(compensate="bias"), calib)
    on_gpu = prune_streamed(source, tmp_path / "gpu", _config(compensate="bias"), calib, device="cuda")
    assert on_gpu.steps[0].plan == on_cpu.steps[0].plan
    a, b = load_pruned(tmp_path / "cpu").state_dict(), load_pruned(tmp_path / "gpu").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def _phi3_folder(folder):
    """A tiny Phi-3 folder, its weights scaled up so that a wrong map shows in the logits."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0 if p.dim() == 2 else 1.0)
    model.save_pretrained(folder)


@pytest.mark.parametrize(
    ("family", "settings", "messages"),
    [
        ("llama-mqa", dict(attention="kv"), ("single key/value head",) * 2),
        ("phi3", dict(attention="none", target="gguf"), ("`target` gguf: llmp exports the Llama layout",) * 2),
        # llmp's Phi-3 adapter unregistered: in memory, the automatic map fails the check on query
        # heads (Phi-3 slices q/k/v by the config's head count); streamed, any automatic family is
        # refused by name (discovery traces real weights, which streaming never holds).
        (
            "phi3-unknown",
            dict(attention="query", mlp=False),
            ("equivalence check failed.*query_heads", "needs a family adapter"),
        ),
    ],
)
def test_streaming_refuses_what_the_in_memory_path_refuses(family, settings, messages, tmp_path, calib, monkeypatch):
    """One preflight for every driver: `prune_streamed` refuses whatever `prune` refuses, before
    anything is scored or written."""
    from transformers import AutoModelForCausalLM

    import llmp.structure.adapters as registry

    source = tmp_path / "source"
    if family.startswith("phi3"):
        _phi3_folder(source)
    else:
        tiny_model(family).save_pretrained(source)
    if family == "phi3-unknown":
        monkeypatch.setattr(registry, "_ADAPTERS", {k: v for k, v in registry._ADAPTERS.items() if k != "phi3"})
    config = _config(**{"criterion": "flap", **settings})
    with pytest.raises(LlmpError, match=messages[0]):
        prune(AutoModelForCausalLM.from_pretrained(source), config, calib)
    with pytest.raises(LlmpError, match=messages[1]):
        prune_streamed(source, tmp_path / "out", config, calib)
    assert not (tmp_path / "out").exists()
