"""Mixture-of-experts models (``llmp.structure.adapters.moe``): whole experts removed physically
compute what the original computes with those experts' router logits at −∞, for every supported
family (top-k renormalised or not, a shared expert, dense layers between MoE ones); the output
loads in plain transformers and in llmp with identical logits."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import MOE_FAMILIES, blank_record, logits, prune_and_mask, tiny_moe
from transformers import AutoModelForCausalLM

from llmp import LlmpError, PruneConfig, load_pruned, prune, surgery
from llmp.io import save_pruned
from llmp.structure import Kind, adapter_for

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def expert_plan(model, per_layer: int, seed: int = 0) -> dict[str, list[int]]:
    """``per_layer`` random experts of every MoE layer (a different set in each)."""
    g = torch.Generator().manual_seed(seed)
    structure = adapter_for(model).discover(model, (Kind.EXPERTS,))
    return {grp.name: sorted(torch.randperm(grp.size, generator=g)[:per_layer].tolist()) for grp in structure.groups}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_removed_experts_compute_what_masked_router_logits_compute(family):
    model = tiny_moe(family)
    kinds = (Kind.EXPERTS,) if family == "olmoe" else (Kind.EXPERTS, Kind.QUERY_HEADS)
    plan = expert_plan(model, 3)
    if family != "olmoe":
        plan["layers.1.query_heads"] = [1, 3]  # one query head of each KV group
    pruned, masked, _ = prune_and_mask(model, kinds, plan=plan)
    torch.testing.assert_close(logits(pruned, IDS), logits(masked, IDS), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(model, IDS), logits(masked, IDS), atol=1e-3)  # the removal matters
    moe_layers = [s for s in adapter_for(pruned).layer_shapes(pruned) if "experts" in s]
    assert moe_layers and {s["experts"] for s in moe_layers} == {5}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_masked_reference_masking_nothing_is_the_model(family):
    """The reference's router (softmax, top-k, renormalisation) is the family's own."""
    model = tiny_moe(family)
    masked = copy.deepcopy(model)
    adapter = adapter_for(masked)
    structure = adapter.discover(masked, (Kind.EXPERTS,))
    surgery.mask(masked, structure, {g.name: [] for g in structure.groups}, adapter)  # nothing planned: untouched
    for group in structure.groups:
        adapter.mask_experts(masked, group, [])
    torch.testing.assert_close(logits(masked, IDS), logits(model, IDS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_pruned_moe_loads_in_plain_transformers_and_in_llmp(family, tmp_path):
    pruned, _, _ = prune_and_mask(tiny_moe(family), (Kind.EXPERTS,), plan=expert_plan(tiny_moe(family), 3))
    expected = logits(pruned, IDS)
    save_pruned(pruned, tmp_path / "out", record=blank_record())
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert plain.config.num_experts_per_tok == 2
    atol = 1e-6 if family == "granitemoe" else 0  # transformers' own reload of a dense Granite-MoE differs by 1e-7
    torch.testing.assert_close(logits(plain, IDS), expected, rtol=0, atol=atol)
    torch.testing.assert_close(logits(load_pruned(tmp_path / "out"), IDS), expected, rtol=0, atol=atol)


def test_top_k_never_exceeds_the_experts_kept(tmp_path):
    model = tiny_moe("qwen3_moe", num_experts_per_tok=4)
    pruned, masked, _ = prune_and_mask(model, (Kind.EXPERTS,), plan=expert_plan(model, 6))
    assert pruned.config.num_experts_per_tok == 2 and pruned.config.num_experts == 2
    assert all(adapter_for(pruned).layers(pruned)[i].mlp.gate.top_k == 2 for i in range(3))
    torch.testing.assert_close(logits(pruned, IDS), logits(masked, IDS), rtol=0, atol=1e-5)
    save_pruned(pruned, tmp_path / "out", record=blank_record())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(plain, IDS), logits(pruned, IDS), rtol=0, atol=0)


def test_removing_a_layer_keeps_the_dense_layers_dense(tmp_path):
    """Qwen-MoE says which layers are dense by index (``mlp_only_layers``): the indices move with the layers."""
    model = tiny_moe("qwen3_moe-dense", layers=4)
    pruned, masked, _ = prune_and_mask(model, (Kind.LAYERS,), plan={"layers": [0]})
    assert pruned.config.mlp_only_layers == [0] and pruned.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(pruned, IDS), logits(masked, IDS), rtol=0, atol=1e-5)
    save_pruned(pruned, tmp_path / "out", record=blank_record())
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    torch.testing.assert_close(logits(plain, IDS), logits(pruned, IDS), rtol=0, atol=0)


def test_olmoe_heads_are_refused_with_the_reason():
    model = tiny_moe("olmoe")
    with pytest.raises(LlmpError, match="q_norm and k_norm normalise over all heads"):
        adapter_for(model).discover(model, (Kind.QUERY_HEADS,))


def calibration(n: int = 8, length: int = 64) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_expert_statistics_are_what_the_router_and_experts_compute(family):
    """REAP, frequency, router weight and output norm of layer 0 by hand, from its MoE block's input."""
    from llmp.importance.experts import recording

    model = tiny_moe(family)
    block = model.model.layers[0].mlp
    seen = []
    handle = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 64)))
    with recording(block) as stats:
        model(calibration(2, 16))
    handle.remove()
    x = torch.cat(seen).double()
    probs = torch.softmax(x @ block.gate.weight.double().T, dim=-1)
    top, index = probs.topk(2, dim=-1)
    if family == "qwen3_moe":  # norm_topk_prob
        top = top / top.sum(-1, keepdim=True)
    experts = block.experts
    for e in range(8):
        rows, slot = torch.where(index == e)
        gate, up = (x[rows] @ experts.gate_up_proj[e].double().T).chunk(2, dim=-1)
        norms = ((torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].double().T).norm(dim=-1)
        assert stats.routed[e] == len(rows)
        torch.testing.assert_close(stats.probability[e], probs[:, e].sum(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.norm[e], norms.sum(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.weighted_norm[e], (top[rows, slot] * norms).sum(), rtol=1e-4, atol=1e-5)
    assert stats.tokens == len(x)


@pytest.mark.parametrize("criterion", ["reap", "frequency", "router_weight", "activation_norm"])
def test_experts_alone_remove_that_fraction_of_every_layer_and_nothing_else(criterion):
    model = tiny_moe("qwen3_moe-dense", layers=4, num_experts_per_tok=4)
    before = adapter_for(model).layer_shapes(model)
    record = prune(model, PruneConfig(experts=0.75, expert_criterion=criterion), calibration())
    after = adapter_for(model).layer_shapes(model)
    for old, new in zip(before, after, strict=True):
        assert new == ({**old, "experts": 2} if "experts" in old else old)  # 6 of 8 go; heads, dense MLP stay
    assert model.config.num_experts == 2 and model.config.num_experts_per_tok == 2
    assert [s.kinds for s in record.steps] == [["experts"]] and record.settings["ratio"] == 0.0
    assert all(len(v) == 6 for v in record.steps[0].plan.values()) and len(record.steps[0].plan) == 3


def test_experts_then_ratio_prune_the_other_kinds_on_top():
    model = tiny_moe("qwen3_moe-dense", layers=4)
    total = sum(p.numel() for p in model.parameters())
    record = prune(model, PruneConfig(experts=0.5, ratio=0.05, attention="query"), calibration())
    experts_only = record.steps[0].params_before - record.steps[0].params_after
    assert [s.kinds for s in record.steps] == [["experts"], ["query_heads", "mlp"]]
    assert abs(record.params_before - record.params_after - experts_only - 0.05 * total) < 0.01 * total
    assert record.params_before == total


def test_a_pruned_step_replays(tmp_path):
    from llmp.pruning import replay

    model, again = tiny_moe("mixtral"), tiny_moe("mixtral")
    record = prune(model, PruneConfig(experts=0.5), calibration())
    replay(again, record.steps)
    torch.testing.assert_close(logits(again, IDS), logits(model, IDS), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        ("qwen3_moe", dict(experts=1.0), "`experts` must be in \\[0, 1\\)"),
        ("qwen3_moe", dict(experts=0.01), "`experts` 0.01 removes 0 of the 8 experts"),
        ("qwen3_moe", dict(experts=0.5, ratio=1.0), "`ratio` must be in \\[0, 1\\) with `experts`"),
        ("llama", dict(experts=0.5), "`experts` 0.5: this llama model has no mixture-of-experts layers"),
    ],
)
def test_expert_settings_are_checked(model, kwargs, message):
    from helpers import tiny_model

    with pytest.raises(LlmpError, match=message):
        prune(tiny_moe(model) if model != "llama" else tiny_model("llama-gqa"), PruneConfig(**kwargs), calibration())


def test_llmp_prune_experts_writes_a_folder_plain_transformers_loads(tmp_path, capsys):
    from helpers import run_cli, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_moe("qwen2_moe", vocab_size=len(tokenizer), max_position_embeddings=512)
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    code, out, err = run_cli(
        capsys, "prune", "--model", tmp_path / "moe", "--experts", "0.25", "--output", tmp_path / "out",
        "--num-samples", "4", "--seq-len", "64", "--samples", "0",
    )  # fmt: skip
    assert code == 0, err
    assert "25% of every MoE layer's experts" in out
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    assert plain.config.num_experts == 6 and plain.config.num_experts_per_tok == 2
    ids = tokenizer("The river", return_tensors="pt").input_ids
    assert plain.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


@pytest.mark.parametrize("family", ["qwen3_moe-dense", "mixtral", "qwen2_moe", "granitemoe"])
def test_streamed_expert_pruning_equals_the_in_memory_one(family, tmp_path):
    """From the per-expert tensors transformers saves, one layer at a time, to a folder plain
    transformers loads: the same experts removed and the same logits as in memory."""
    from llmp.pruning import prune_streamed

    model = tiny_moe(family, layers=4)
    model.save_pretrained(tmp_path / "dense")
    record = prune_streamed(tmp_path / "dense", tmp_path / "out", PruneConfig(experts=0.5), calibration())
    in_memory = prune(model, PruneConfig(experts=0.5), calibration())
    assert record.steps[0].plan == in_memory.steps[0].plan
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    torch.testing.assert_close(logits(plain, IDS), logits(model, IDS), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(load_pruned(tmp_path / "out"), IDS), logits(model, IDS), rtol=0, atol=1e-5)


def test_streaming_experts_and_a_ratio_at_once_is_refused(tmp_path):
    from llmp.pruning import prune_streamed

    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "dense")
    with pytest.raises(LlmpError, match="`stream` prunes experts in a pass of their own"):
        prune_streamed(tmp_path / "dense", tmp_path / "out", PruneConfig(experts=0.5, ratio=0.1), calibration())
    assert not (tmp_path / "out").exists()


def test_the_streamed_benchmark_and_the_plain_load_check_run_on_a_tiny_moe(tmp_path):
    """bench/scale.py --experts and bench/plain_load.py, as docs/benchmarks/moe.md runs them on the OLMoE shape."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from helpers import tiny_tokenizer

    bench = Path(__file__).resolve().parents[1] / "bench"
    tokenizer = tiny_tokenizer()
    tiny_moe("olmoe", vocab_size=len(tokenizer), max_position_embeddings=512).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    run = [sys.executable, bench / "scale.py", "--folder", tmp_path / "m", "--experts", "0.5", "--num-samples", "4"]
    scale = json.loads(subprocess.run([str(a) for a in run], check=True, capture_output=True, text=True).stdout)
    assert scale["settings"]["experts"] == 0.5 and scale["params_after"] < scale["params_before"]
    run = [sys.executable, bench / "plain_load.py", tmp_path / "m-pruned", "--new-tokens", "3"]
    loaded = json.loads(subprocess.run([str(a) for a in run], check=True, capture_output=True, text=True).stdout)
    assert loaded["clean"] and loaded["config"]["num_experts"] == 4 and loaded["generated_tokens"] == 3


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny Qwen2-MoE folder (shared expert, 8 experts) with a real tokenizer."""
    from helpers import make_tiny_moe_folder

    return make_tiny_moe_folder(tmp_path_factory.mktemp("tiny-moe"))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_fit_prunes_experts_and_recovers_with_distillation(moe_dir, tmp_path, mode):
    """The callback removes experts at fit start; LoRA adapts attention and the fused experts
    (peft's target_parameters) with routers frozen, full training moves the routers too; the
    export loads in plain transformers with the trained model's logits."""
    import lightning as L

    from llmp.callbacks import StructuredPruning
    from llmp.data.recovery import InstructionData
    from llmp.distill import DistillSettings
    from llmp.recovery import RecoveryModule

    module = RecoveryModule(
        str(moe_dir), mode=mode, learning_rate=1e-2, warmup_steps=0, distill=DistillSettings(weight=0.5)
    )
    data = InstructionData(
        path="alpaca-1k", tokenizer=str(moe_dir), max_samples=12, val_size=2, cutoff_len=128, batch_size=2
    )
    callback = StructuredPruning(PruneConfig(experts=0.5), num_samples=2, seq_len=32)
    fit = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    fit.fit(module, datamodule=data)
    trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
    if mode == "lora":
        assert any("experts" in n and "lora_" in n for n in trained)
        assert not any(n.endswith("mlp.gate.weight") for n in trained)  # routers frozen
    else:
        assert any(n.endswith("mlp.gate.weight") for n in trained)
    assert module.record.steps[0].kinds == ["experts"]
    out = module.export(tmp_path / "out", {"mode": mode})
    plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert plain.config.num_experts == 4
    ids = torch.randint(0, 200, (2, 12))
    torch.testing.assert_close(logits(plain, ids), logits(module.model, ids), rtol=0, atol=1e-5)


def test_an_unknown_moe_family_is_refused_by_name_with_what_it_lacks():
    import transformers

    config = transformers.GptOssConfig(
        num_local_experts=4, num_experts_per_tok=2, hidden_size=64, intermediate_size=32, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=128,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.GptOssForCausalLM(config)
    with pytest.raises(LlmpError, match="`gpt_oss` is a mixture-of-experts model.*its router and experts have biases"):
        adapter_for(model)


@pytest.mark.parametrize(
    ("family", "argv", "message"),
    [
        ("qwen2_moe", ["--experts", "0.05"], "`--experts` 0.05 removes 0 of the 8 experts"),
        ("llama", ["--experts", "0.5"], "`--experts` 0.5: this llama model has no mixture-of-experts layers"),
    ],
)
def test_expert_flags_are_refused_before_the_model_loads(family, argv, message, tmp_path, capsys, monkeypatch):
    from helpers import make_tiny_folder, run_cli

    import llmp.models

    folder = tmp_path / "m"
    if family == "llama":
        make_tiny_folder(folder)
    else:
        tiny_moe(family, max_position_embeddings=512).save_pretrained(folder)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(llmp.models, "load_model", no_loading)
    code, _, err = run_cli(capsys, "prune", "--model", folder, "--output", tmp_path / "out", *argv)
    assert code != 0 and message in err


def test_the_report_shows_experts_kept_and_their_routing(tmp_path):
    from llmp.record import PruningRecord
    from llmp.report import render_markdown

    model = tiny_moe("mixtral")
    record = prune(model, PruneConfig(experts=0.5, expert_criterion="frequency"), calibration())
    routing = record.steps[0].routing
    assert set(routing) == set(record.steps[0].plan) and all(len(v) == 8 for v in routing.values())
    assert all(abs(sum(v) - 2.0) < 1e-4 for v in routing.values())  # top-2: two routings per token
    record = PruningRecord.from_json(record.to_json())
    text = render_markdown(record, record.dense_layer_shapes, [], None, "report.png")
    assert "| experts kept |" in text or "experts kept |" in text
    assert "| layers.0.experts | 4 of 8 |" in text
    kept_share = float(text.split("| layers.0.experts | 4 of 8 | ")[1].split("%")[0])
    assert kept_share > 50  # by frequency, the kept half took most of the routing


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_a_pruned_moe_runs_in_llamacpp_with_the_same_logits(family, tmp_path):
    """llmp export --format gguf writes llama.cpp's own MoE architecture (Mixtral: llama with
    experts), from the per-expert tensors of an in-memory save and from the fused ones --stream
    writes; llama.cpp computes what transformers computes."""
    pytest.importorskip("llama_cpp")
    from helpers import tiny_tokenizer

    from llmp.eval.llamacpp import LlamaCpp
    from llmp.export import export
    from llmp.pruning import prune_streamed

    tokenizer = tiny_tokenizer()
    kv = {"num_key_value_heads": 4} if family == "olmoe" else {}  # llama.cpp's olmoe: no grouped KV heads
    model = tiny_moe(family, vocab_size=len(tokenizer), max_position_embeddings=512, **kv)
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    ids = tokenizer("The river flows into the sea near the town", return_tensors="pt").input_ids
    config = PruneConfig(experts=0.5, expert_channels=0.25)  # experts of width 24: q8_0's blocks do not fit, f32 does
    prune_streamed(tmp_path / "dense", tmp_path / "streamed", config, ids.repeat(2, 4), tokenizer)
    prune(model, config, ids.repeat(2, 4))
    save_pruned(model, tmp_path / "memory", tokenizer, record=blank_record())
    expected = logits(model, ids)[0].numpy()
    for folder in ("memory", "streamed"):
        exported = export(tmp_path / folder, "gguf", tmp_path / f"{folder}.gguf", dtype="f32")
        with LlamaCpp(exported.path, n_ctx=64, threads=1) as engine:
            got = engine.logits(ids[0].tolist())
        assert abs(got - expected).max() < 1e-4, (folder, abs(got - expected).max())


def test_moe_exports_llamacpp_would_compute_differently_are_refused(tmp_path):
    from llmp.export import export

    tiny_moe("qwen3_moe-dense").save_pretrained(tmp_path / "m")  # a dense layer, no renormalisation
    with pytest.raises(LlmpError, match="llama.cpp's qwen3moe always renormalises"):
        export(tmp_path / "m", "gguf", tmp_path / "m.gguf")
    with pytest.raises(LlmpError, match="vLLM's DeciLM holds no experts"):
        export(tmp_path / "m", "decilm", tmp_path / "m.decilm")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_removed_expert_channels_compute_what_zeroed_down_columns_compute(family):
    """Each expert keeps its own channels (a different set per expert, the same count), with and
    without whole experts removed in the same plan."""
    model = tiny_moe(family)
    g = torch.Generator().manual_seed(3)
    structure = adapter_for(model).discover(model, (Kind.EXPERT_CHANNELS,))
    plan = {
        grp.name: sorted(b * 32 + int(c) for b in range(8) for c in torch.randperm(32, generator=g)[:12])
        for grp in structure.groups
    }
    for extra in ({}, {name.replace("expert_channels", "experts"): [1, 4] for name in plan}):
        pruned, masked, _ = prune_and_mask(model, (Kind.EXPERT_CHANNELS, Kind.EXPERTS), plan={**plan, **extra})
        torch.testing.assert_close(logits(pruned, IDS), logits(masked, IDS), rtol=0, atol=1e-5)
        moe_layers = [s for s in adapter_for(pruned).layer_shapes(pruned) if "experts" in s]
        assert {s["expert_mlp"] for s in moe_layers} == {20}


def test_expert_channel_scores_are_the_routed_gate_weighted_energy_times_the_column_norm():
    from llmp.importance.experts import channel_recording, channel_scores

    model = tiny_moe("qwen3_moe")
    block = model.model.layers[1].mlp
    seen = []
    handle = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 64)))
    with channel_recording(block) as stats:
        model(calibration(2, 16))
    handle.remove()
    x = torch.cat(seen).double()
    top, index = torch.softmax(x @ block.gate.weight.double().T, dim=-1).topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    experts = block.experts
    for e in (0, 5):
        rows, slot = torch.where(index == e)
        gate, up = (x[rows] @ experts.gate_up_proj[e].double().T).chunk(2, dim=-1)
        a = torch.nn.functional.silu(gate) * up * top[rows, slot, None]
        expected = a.pow(2).sum(0) * experts.down_proj[e].double().pow(2).sum(0)
        torch.testing.assert_close(channel_scores(block, stats)[e], expected, rtol=1e-4, atol=1e-6)


def test_expert_channels_prune_every_expert_alike_stream_and_replay(tmp_path):
    from llmp.pruning import prune_streamed, replay

    model, again = tiny_moe("qwen2_moe", layers=4), tiny_moe("qwen2_moe", layers=4)
    model.save_pretrained(tmp_path / "dense")
    config = PruneConfig(experts=0.5, expert_channels=0.25, compensate="none")  # replay repeats no refit
    record = prune(model, config, calibration())
    assert [s.kinds for s in record.steps] == [["experts"], ["expert_channels"]]
    assert record.steps[0].params_after == record.steps[1].params_before
    assert record.steps[1].params_after == record.params_after
    assert {(s["experts"], s["expert_mlp"]) for s in record.layer_shapes} == {(4, 24)}
    replay(again, record.steps)
    torch.testing.assert_close(logits(again, IDS), logits(model, IDS), rtol=0, atol=0)
    streamed = prune_streamed(tmp_path / "dense", tmp_path / "out", config, calibration())
    assert [s.plan for s in streamed.steps] == [s.plan for s in record.steps]
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()) and plain.config.moe_intermediate_size == 24
    torch.testing.assert_close(logits(plain, IDS), logits(model, IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "settings",
    [dict(ratio=0.02, attention="query"), dict(ratio=0.04, attention="kv"), dict(ratio=0.2, scope="layer")],
    ids=["query-heads", "kv-groups", "layers"],
)
def test_heads_and_layers_prune_on_a_moe_as_on_a_dense_model(settings, tmp_path):
    """Without experts asked, a Mixtral loses heads (flap, layer by layer) or whole layers (Taylor);
    the folder loads in plain transformers with the pruned model's logits."""
    model = tiny_moe("mixtral", layers=4)
    record = prune(model, PruneConfig(**settings), calibration())
    assert 0 < record.achieved_ratio and {s.kinds[0] for s in record.steps} <= {"query_heads", "kv_groups", "layers"}
    save_pruned(model, tmp_path / "out", record=blank_record())
    torch.testing.assert_close(logits(load_pruned(tmp_path / "out"), IDS), logits(model, IDS), rtol=0, atol=1e-5)


def test_the_refit_of_each_expert_brings_the_pruned_model_closer_to_the_dense_one():
    """lstsq (the default) refits each expert's kept down columns to what the whole expert wrote on
    its routed calibration tokens: the pruned model's logits move less than without it."""
    dense, calib = tiny_moe("qwen3_moe"), calibration(16, 64)
    errors = {}
    for compensate in ("none", "lstsq"):
        model = tiny_moe("qwen3_moe")
        record = prune(model, PruneConfig(expert_channels=0.5, compensate=compensate), calib)
        assert record.settings["compensate"] == compensate
        errors[compensate] = float((logits(model, calib) - logits(dense, calib)).pow(2).mean())
    assert errors["lstsq"] < 0.95 * errors["none"], errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_expert_pruning_on_cuda_removes_what_the_cpu_removes(tmp_path):
    from llmp.pruning import prune_streamed

    tiny_moe("qwen3_moe", layers=4).save_pretrained(tmp_path / "dense")
    config = PruneConfig(experts=0.5, expert_channels=0.25)
    on_cpu = prune_streamed(tmp_path / "dense", tmp_path / "cpu", config, calibration())
    on_gpu = prune_streamed(tmp_path / "dense", tmp_path / "gpu", config, calibration(), device="cuda")
    assert on_gpu.steps[0].plan == on_cpu.steps[0].plan  # the experts; channel ties may order differently
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "gpu")
    assert plain.config.num_experts == 4


def test_target_gguf_keeps_expert_widths_in_whole_q8_0_blocks(tmp_path):
    model = tiny_moe("qwen3_moe", moe_intermediate_size=96)
    record = prune(model, PruneConfig(experts=0.25, expert_channels=0.4, target="gguf"), calibration())
    assert {s["expert_mlp"] for s in record.layer_shapes} == {64}  # 96 - 38 = 58 → 64, the nearest multiple of 32
