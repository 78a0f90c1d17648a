"""Gradient-free criteria (flap, wanda) and compensation (bias, lstsq) match their definitions,
and compensated models save, load and (uniform) open in plain transformers."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from helpers import logits, n_params, tiny_model
from transformers import AutoModelForCausalLM

from llmp import LlmpError, PruneConfig, importance, load_pruned, prune, save_pruned
from llmp.importance import activations
from llmp.io import REPORT
from llmp.structure import Kind, adapter_for


def _inputs_of(model, module, calib):
    seen = []
    handle = module.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        model(input_ids=calib)
    handle.remove()
    return torch.cat(seen).double()


@pytest.mark.parametrize("criterion", ["flap", "wanda"])
def test_activation_scores_match_their_definition(calib, criterion):
    model = tiny_model("llama-gqa")
    structure = adapter_for(model).discover(model, (Kind.KV_GROUPS, Kind.MLP))
    scores = importance.score(model, structure, calib, criterion)
    layer = model.model.layers[1]
    for module, name, width in (
        (layer.mlp.down_proj, "layers.1.mlp", 1),
        (layer.self_attn.o_proj, "layers.1.kv_groups", None),
    ):
        x, w = _inputs_of(model, module, calib), module.weight.detach().double()
        if criterion == "flap":
            channel = x.var(0, unbiased=False) * (w**2).sum(0)
        else:
            channel = x.norm(dim=0) * w.abs().sum(0)
        size = scores[name].numel()
        expected = channel.view(size, -1).sum(1) if width is None else channel
        torch.testing.assert_close(scores[name], expected, rtol=1e-6, atol=1e-12)


def test_bias_compensation_equals_mean_replacement(calib, inputs):
    """Pruned + bias = the dense model whose removed channels always carry their calibration mean."""
    model = tiny_model("llama-gqa")
    dense = copy.deepcopy(model)
    record = prune(
        model,
        PruneConfig(ratio=0.25, attention="kv", criterion="flap", compensate="bias", layers="0:4", layerwise=False),
        calib,
    )
    (step,) = record.steps
    groups = adapter_for(dense).discover(dense, (Kind.KV_GROUPS, Kind.MLP))
    replaced = []  # (module, columns, mean), all measured on the dense model first (one-shot statistics)
    for i, layer in enumerate(dense.model.layers):
        for module, group in (
            (layer.mlp.down_proj, f"layers.{i}.mlp"),
            (layer.self_attn.o_proj, f"layers.{i}.kv_groups"),
        ):
            width = module.in_features // groups[group].size
            columns = torch.tensor(
                [e * width + j for e in step.plan.get(group, []) for j in range(width)], dtype=torch.long
            )
            replaced.append((module, columns, _inputs_of(dense, module, calib)[:, columns].mean(0).float()))

    def replace(_m, args, columns, mean):
        x = args[0].clone()
        x[..., columns] = mean
        return (x,)

    handles = [
        m.register_forward_pre_hook(lambda m_, a, c=c, v=v: replace(m_, a, c, v)) for m, c, v in replaced if len(c)
    ]
    assert handles and all(layer.mlp.down_proj.bias is not None for layer in model.model.layers)
    torch.testing.assert_close(logits(model, inputs), logits(dense, inputs), rtol=1e-4, atol=1e-4)


def test_covariance_block_is_the_block_of_the_covariance():
    """`InputStats.covariance(rows, cols)` equals the block of the whole covariance, the direct
    definition E[x xᵀ] − μ μᵀ."""
    x = torch.randn(300, 12, dtype=torch.float64) * torch.arange(1, 13) + torch.arange(12)
    zeros = torch.zeros(12, dtype=torch.float64)
    stats = activations.InputStats(0, zeros.clone(), zeros.clone(), torch.zeros(12, 12, dtype=torch.float64))
    stats.add(x[:200])
    stats.add(x[200:])
    mean = x.mean(0)
    direct = (x - mean).T @ (x - mean) / x.shape[0]
    rows, cols = torch.tensor([0, 3, 4, 11]), torch.tensor([1, 2, 7])
    full = stats.covariance()
    torch.testing.assert_close(full, direct, rtol=0, atol=1e-4)  # the products are summed from float32
    torch.testing.assert_close(stats.covariance(rows, cols), full[rows][:, cols], rtol=1e-12, atol=1e-12)


def test_lstsq_reconstructs_the_dense_output_best(calib):
    """On the calibration inputs, each output projection's error: lstsq < bias < none."""
    errors = {}
    dense = tiny_model("llama-mha")
    targets = {}
    for mode in ("none", "bias", "lstsq"):
        model = copy.deepcopy(dense)
        config = PruneConfig(ratio=0.3, criterion="flap", compensate=mode, mlp_layers="0:4", layerwise=False)
        # inputs to down_proj of the dense model (the pruned one sees them minus the removed channels)
        xs = {i: _inputs_of(dense, layer.mlp.down_proj, calib) for i, layer in enumerate(dense.model.layers)}
        targets = {
            i: xs[i] @ layer.mlp.down_proj.weight.detach().double().T for i, layer in enumerate(dense.model.layers)
        }
        plan = prune(model, config, calib).steps[0].plan
        total = 0.0
        for i, layer in enumerate(model.model.layers):
            kept = sorted(set(range(xs[i].shape[1])) - set(plan.get(f"layers.{i}.mlp", [])))
            proj = layer.mlp.down_proj
            out = xs[i][:, kept] @ proj.weight.detach().double().T
            if proj.bias is not None:
                out = out + proj.bias.detach().double()
            total += float((out - targets[i]).pow(2).mean())
        errors[mode] = total
    assert errors["lstsq"] < errors["bias"] < errors["none"]


def test_a_larger_ridge_keeps_the_refit_closer_to_the_kept_weights(calib):
    """``ridge`` is the refit's one knob: as it grows, lstsq moves the kept columns less."""
    dense = tiny_model("llama-mha")
    moved = []
    for ridge in (0.01, 1.0, 100.0):
        model = copy.deepcopy(dense)
        config = PruneConfig(ratio=0.3, criterion="flap", compensate="lstsq", mlp_layers="0:4", ridge=ridge)
        plan = prune(model, config, calib).steps[0].plan
        kept = sorted(set(range(dense.config.intermediate_size)) - set(plan["layers.1.mlp"]))
        before = dense.model.layers[1].mlp.down_proj.weight.detach()[:, kept]
        moved.append(float((model.model.layers[1].mlp.down_proj.weight.detach() - before).norm()))
    assert moved[0] > moved[1] > moved[2] > 0


@pytest.mark.parametrize("compensate", ["bias", "lstsq"])
def test_compensated_model_saves_and_loads(calib, inputs, tmp_path, compensate):
    model = tiny_model("llama-gqa")
    record = prune(model, PruneConfig(ratio=0.2, attention="kv", criterion="wanda", compensate=compensate), calib)
    assert record.params_after == n_params(model)  # the biases are counted
    out = save_pruned(model, tmp_path / "m", record=record)
    assert json.loads((out / "config.json").read_text())["llmp_biases"] == ["mlp.down_proj", "self_attn.o_proj"]
    loaded = load_pruned(out)
    assert n_params(loaded) == record.params_after
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


def test_uniform_compensated_model_loads_in_plain_transformers(calib, inputs, tmp_path):
    model = tiny_model("llama-gqa")
    record = prune(model, PruneConfig(ratio=0.2, criterion="flap", compensate="bias", layout="uniform"), calib)
    assert model.config.mlp_bias and not model.config.attention_bias  # only the MLP lost channels
    # every MLP linear now has a bias: zeros for gate/up, counted in the record
    assert all(layer.mlp.gate_proj.bias is not None for layer in model.model.layers)
    assert record.params_after == n_params(model)
    out = save_pruned(model, tmp_path / "u", record=record)
    assert json.loads((out / REPORT).read_text())["loads_with_plain_transformers"] is True
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert n_params(plain) == record.params_after
    torch.testing.assert_close(logits(plain, inputs), logits(model, inputs), rtol=0, atol=1e-6)


def test_taylor_plan_with_bias_compensation(calib):
    model = tiny_model("llama-mha")
    plain = copy.deepcopy(model)
    with_bias = prune(model, PruneConfig(ratio=0.2, criterion="taylor", compensate="bias"), calib)
    without = prune(plain, PruneConfig(ratio=0.2, criterion="taylor"), calib)
    assert with_bias.steps[0].plan == without.steps[0].plan  # same plan, then the bias
    assert model.model.layers[1].mlp.down_proj.bias is not None and plain.model.layers[1].mlp.down_proj.bias is None


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            dict(scope="layer", criterion="flap"),
            "`criterion` flap scores heads and MLP channels only: use it with `scope` block (got 'layer')",
        ),
        (dict(scope="channel", compensate="bias"), "`compensate` bias works on heads and MLP channels only"),
        (dict(compensate="mean"), "`compensate` must be one of none, bias, lstsq; got 'mean'"),
        (dict(ridge=0.0), "`ridge` must be > 0 (a multiple of the mean input variance, e.g. 1.0); got 0.0"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(LlmpError, match=re.escape(message)):
        PruneConfig(**settings)


def test_activation_criterion_needs_calibration():
    model = tiny_model("llama-mha")
    with pytest.raises(LlmpError, match="need calibration tokens"):
        prune(model, PruneConfig(criterion="flap"), None)
    assert (
        PruneConfig(criterion="wanda").needs_calibration
        and PruneConfig(criterion="l2", compensate="bias").needs_calibration
    )
    assert not PruneConfig(criterion="l2").needs_calibration


def test_stats_cover_every_token(calib):
    model = tiny_model("llama-mha")
    name = "model.layers.0.mlp.down_proj"
    stats = activations.collect(model, [name], calib, batch_size=1)
    x = _inputs_of(model, model.get_submodule(name), calib)
    assert stats[name].count == calib.numel()
    torch.testing.assert_close(stats[name].mean, x.mean(0))


@pytest.mark.parametrize("layout", ["heterogeneous", "uniform"])
def test_replay_rebuilds_the_biases(calib, inputs, layout):
    """A checkpoint's shapes are rebuilt by replay: compensation's biases (and a uniform model's
    declared zeros) must be there for its weights to load."""
    original = tiny_model("llama-gqa")
    model = copy.deepcopy(original)
    record = prune(model, PruneConfig(ratio=0.2, criterion="flap", compensate="bias", layout=layout), calib)
    assert record.steps[0].biases
    from llmp.pruning import replay

    replay(original, record.steps)
    original.load_state_dict(model.state_dict())  # strict: the same parameters, biases included
    torch.testing.assert_close(logits(original, inputs), logits(model, inputs), rtol=0, atol=0)


def test_memory_saving_splits_change_no_number():
    """The next layer's inputs come from forwards of NEXT_TOKENS tokens, and the Gram is summed a
    band of rows at a time: both give exactly what one forward and one product give."""
    from llmp.pruning.layercalls import NEXT_TOKENS, layer_inputs
    from llmp.pruning.layercalls import run_layer as _run

    model = tiny_model("llama-gqa")
    calib = torch.randint(0, 100, (8, 128), generator=torch.Generator().manual_seed(0))
    assert calib.numel() > NEXT_TOKENS  # split into more than one forward
    inputs = layer_inputs(model, calib, None, torch.float32)
    layer = model.model.layers[1]
    assert torch.equal(_run(layer, inputs)[0][0], _run(layer, inputs, whole=True)[0][0])

    x = torch.randn(64, 2100, generator=torch.Generator().manual_seed(1))  # 2,100 columns: two bands
    stats = activations.InputStats(0, torch.zeros(2100, dtype=torch.float64), torch.zeros(2100, dtype=torch.float64))
    stats.gram = torch.zeros(2100, 2100, dtype=torch.float64)
    stats.add(x)
    assert torch.equal(stats.gram, torch.zeros_like(stats.gram) + x.T @ x)
