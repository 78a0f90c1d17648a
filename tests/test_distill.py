"""Distillation from the unpruned model (llmp.distill) and general-text recovery data (RecoveryData)."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import recipe_file
from test_recovery import data, trainer

from llmp.callbacks import StructuredPruning
from llmp.checkpoints import read_entry
from llmp.data import RecoveryData, calibration_samples
from llmp.data.recovery import EpochShuffle, pack, source_format
from llmp.distill import DistillSettings, Teacher, divergence, position_logits, recovery_loss
from llmp.errors import LlmpError
from llmp.fit import main as fit_main
from llmp.fit import prune_again
from llmp.models import load_model
from llmp.pruning import PruneConfig, count_parameters, prune
from llmp.record import Calibration
from llmp.recovery import RecoveryModule


def batch_of(dm: RecoveryData) -> dict[str, torch.Tensor]:
    return next(iter(dm.train_dataloader()))


def padded(tiny_dir) -> dict[str, torch.Tensor]:
    """A batch of instruction records with prompts (label -100) and padding."""
    batch = batch_of(data(tiny_dir, cutoff_len=512, batch_size=4))
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()
    return batch


# -- the loss -------------------------------------------------------------------------------------
def test_language_model_loss_equals_the_models_own(tiny_dir):
    model, _ = load_model(str(tiny_dir))
    batch = padded(tiny_dir)
    loss, parts = recovery_loss(model, batch)
    plain = model(**{k: v for k, v in batch.items() if k != "example"}).loss
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    assert parts == {}


def test_position_logits_are_the_models_logits_at_those_positions(tiny_dir):
    model, _ = load_model(str(tiny_dir))
    batch = padded(tiny_dir)
    rows = batch["labels"][:, 1:] != -100
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][rows]
    torch.testing.assert_close(position_logits(model, batch, rows), full, rtol=1e-5, atol=1e-5)
    model.config.final_logit_softcapping = 30.0  # a head the forward changes: the plain path
    torch.testing.assert_close(position_logits(model, batch, rows), full, rtol=1e-5, atol=1e-5)


def reference_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p ‖ q), written out."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def test_divergences_match_their_definitions():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 50, generator=gen).log_softmax(-1)
    teacher = torch.randn(6, 50, generator=gen) * 2
    t_log = teacher.log_softmax(-1)
    torch.testing.assert_close(divergence(student, teacher), reference_kl(t_log, student))
    torch.testing.assert_close(divergence(student, teacher, "reverse_kl"), reference_kl(student, t_log))
    top, index = teacher.topk(5, dim=-1)
    expected = (top.softmax(-1) * (top.log_softmax(-1) - student.gather(-1, index))).sum(-1).mean()
    torch.testing.assert_close(divergence(student, teacher, top_k=5), expected)
    assert divergence(t_log, teacher) < 1e-6 and divergence(t_log, teacher, "reverse_kl") < 1e-6


@pytest.mark.parametrize("tokens", ["labels", "all"])
def test_distillation_from_itself_is_zero_and_mixes_with_ce(tiny_dir, tokens):
    model, _ = load_model(str(tiny_dir))
    batch = padded(tiny_dir)
    same = Teacher(copy.deepcopy(model))
    loss, parts = recovery_loss(model, batch, DistillSettings(tokens=tokens, temperature=2.0), same)
    assert float(loss) < 1e-5 and float(parts["ce"]) > 1
    other = Teacher(copy.deepcopy(model).apply(lambda m: m.weight.data.mul_(0.5) if hasattr(m, "weight") else None))
    mix = DistillSettings(weight=0.25, tokens=tokens)
    loss, parts = recovery_loss(model, batch, mix, other)
    torch.testing.assert_close(loss, 0.25 * parts["kd"] + 0.75 * parts["ce"])
    loss.backward()  # the student gets gradients, the teacher none
    assert all(p.grad is None for p in other.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_forward_kl_has_the_gradient_of_the_autograd_one(temperature):
    from llmp.distill import ForwardKL

    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(5, 40, generator=gen) * 3).requires_grad_()
    teacher = torch.randn(5, 40, generator=gen) * 3
    fused = ForwardKL.apply(student, teacher, temperature)
    (grad,) = torch.autograd.grad(fused * 1.7, student)
    plain = divergence((student / temperature).log_softmax(-1), teacher / temperature)
    (expected,) = torch.autograd.grad(plain * 1.7, student)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(grad, expected)


def test_all_tokens_include_the_prompt(tiny_dir):
    model, _ = load_model(str(tiny_dir))
    batch = padded(tiny_dir)
    teacher = Teacher(copy.deepcopy(model).apply(lambda m: m.weight.data.mul_(0.5) if hasattr(m, "weight") else None))
    labelled = recovery_loss(model, batch, DistillSettings(), teacher)[1]["kd"]
    everything = recovery_loss(model, batch, DistillSettings(tokens="all"), teacher)[1]["kd"]
    mask = batch["attention_mask"].bool()
    rows = mask[:, :-1] & mask[:, 1:]
    with torch.no_grad():
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][rows]
        t = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][rows]
    torch.testing.assert_close(everything, reference_kl(t.log_softmax(-1), s.log_softmax(-1)), rtol=1e-4, atol=1e-6)
    assert not torch.isclose(labelled, everything)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"loss": "js"}, "`distill.loss` must be one of forward_kl, reverse_kl; got 'js'"),
        ({"weight": 1.5}, "`distill.weight` must be in [0, 1]"),
        ({"temperature": 0}, "`distill.temperature` must be > 0; got 0"),
        ({"top_k": 8, "loss": "reverse_kl"}, "`distill.top_k` must be >= 1 and needs `loss: forward_kl`"),
        ({"tokens": "prompt"}, "`distill.tokens` must be one of labels, all; got 'prompt'"),
        ({"dtype": "int8"}, "`distill.dtype` must be one of auto, float32, bfloat16, float16; got 'int8'"),
    ],
)
def test_bad_distill_settings(settings, message):
    with pytest.raises(LlmpError) as err:
        RecoveryModule("smollm2-135m", distill=DistillSettings(**settings))
    assert message in str(err.value)


# -- the teacher in a fit -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_teacher_stays_dense_frozen_and_out_of_the_module(tiny_dir, tmp_path, mode):
    """Across a pruning schedule the teacher stays the dense original, is never trained, and is in
    no state dict, optimizer or checkpoint."""
    module = RecoveryModule(str(tiny_dir), mode=mode, warmup_steps=1, distill=DistillSettings(weight=0.5))
    callback = StructuredPruning(
        PruneConfig(ratio=0.3, attention="kv", layers="0:4"), schedule={0: 0.1, 1: 0.3}, num_samples=2, seq_len=16
    )
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    fit = trainer(callbacks=[callback, ckpt], max_epochs=2, enable_checkpointing=True)
    dense, _ = load_model(str(tiny_dir))
    fit.fit(module, datamodule=data(tiny_dir))
    teacher = module.teacher.model
    assert count_parameters(teacher) == count_parameters(dense) > count_parameters(module.base_model)
    for (name, p), q in zip(teacher.named_parameters(), dense.parameters(), strict=True):
        assert not p.requires_grad and torch.equal(p, q), name
    assert not teacher.training
    owned = {id(p) for p in module.parameters()}
    assert not owned & {id(p) for p in teacher.parameters()}
    assert all("teacher" not in k for k in module.state_dict())
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    state = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)
    assert set(state["state_dict"]) == set(module.state_dict())
    assert read_entry(tmp_path / "ckpts" / "last.ckpt").distill.weight == 0.5
    assert {"train_ce", "train_kd"} <= set(fit.callback_metrics)


def test_default_teacher_of_a_pruned_folder_is_its_original(tiny_dir, tmp_path):
    from llmp.io import save_pruned

    model, tokenizer = load_model(str(tiny_dir))
    record = prune(model, PruneConfig(ratio=0.3, criterion="l1", attention="kv"), None)
    record.model = str(tiny_dir)
    folder = save_pruned(model, tmp_path / "pruned", tokenizer, record)
    module = RecoveryModule(str(folder), distill=DistillSettings())
    module.load_base()
    assert module.teacher.source == str(tiny_dir)
    assert count_parameters(module.teacher.model) > count_parameters(module.model)


def test_teacher_with_another_vocabulary_is_refused(tiny_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmp.models import load_tokenizer

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    load_tokenizer(str(tiny_dir)).save_pretrained(tmp_path / "other")

    module = RecoveryModule(str(tiny_dir), distill=DistillSettings(teacher=str(tmp_path / "other")))
    with pytest.raises(LlmpError, match="has a vocabulary of 99 tokens, the model 320: the teacher must use"):
        module.load_base()


def test_fit_cli_distils_on_general_text(tiny_dir, tmp_path):
    """`llmp fit` with `model.distill` and a text + instruction mixture: the record says so."""
    config = recipe_file(
        tiny_dir,
        tmp_path,
        model={"distill": {"weight": 0.5, "top_k": 16}},
        data={"path": ["c4-train", "alpaca-1k"], "weights": [0.5, 0.5], "max_samples": 24},
        output=tmp_path / "out",
        eval={"data": None},
        trainer={"enable_checkpointing": False},
    )
    assert fit_main(["--config", str(config)]) == 0
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert report["recovery"]["distill"]["weight"] == 0.5 and report["recovery"]["distill"]["top_k"] == 16


# -- general text ---------------------------------------------------------------------------------
def test_text_is_packed_into_full_windows(tiny_dir):
    dm = RecoveryData("c4-train", tokenizer=str(tiny_dir), cutoff_len=64, max_samples=40, val_size=4)
    dm.setup()
    assert dm.train_sizes[0] > 40  # documents are longer than a window
    example = dm.train_set[0]
    assert len(example["input_ids"]) == 64 and example["labels"] == example["input_ids"]
    batch = batch_of(dm)
    assert batch["attention_mask"].all() and (batch["labels"] == batch["input_ids"]).all()
    tokenizer = dm.tokenizer
    docs = ["one two three", "four five"]
    stream = [t for d in docs for t in [*tokenizer(d, add_special_tokens=False).input_ids, tokenizer.eos_token_id]]
    windows = pack(tokenizer, docs, 4)
    assert [t for w in windows for t in w["input_ids"]] == stream[: len(windows) * 4] and len(windows) == len(
        stream
    ) // 4


def test_held_out_documents_are_not_trained_on(tiny_dir, tmp_path):
    docs = [{"text": f"document {i} " + "word " * 60} for i in range(10)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    dm = RecoveryData(str(path), tokenizer=str(tiny_dir), cutoff_len=16, val_size=2)
    dm.setup()

    def decode(ids):  # the tiny tokenizer has no byte-level decoder: undo its spacing by hand
        return dm.tokenizer.decode(ids).replace(" ", "").replace("Ġ", " ")

    train = "".join(decode(e["input_ids"]) for e in dm.train_set)  # consecutive windows
    val = "".join(decode(e["input_ids"]) for e in dm.val_set)
    held = {i for i in range(10) if f"document {i} " in val}
    assert len(held) == 2 and not any(f"document {i} " in train for i in held)


def test_sources_are_told_apart_and_mixed_by_weight(tiny_dir, tmp_path):
    assert source_format("alpaca-1k") == "instruction" and source_format("c4-train") == "text"
    assert source_format("wikitext2") == "text"
    (tmp_path / "odd.jsonl").write_text('{"question": "?"}\n')
    with pytest.raises(LlmpError, match="neither instructions .* nor text .*; set `data.field`"):
        source_format(str(tmp_path / "odd.jsonl"))
    dm = RecoveryData(
        ["c4-train", "alpaca-1k"], weights=[3, 1], tokenizer=str(tiny_dir), max_samples=40, cutoff_len=128
    )
    dm.setup()
    text, records = dm.train_sizes
    sampler = dm.train_dataloader().sampler
    picks = list(sampler)
    assert len(picks) == text + records
    from_text = sum(i < text for i in picks)
    assert abs(from_text / len(picks) - 0.75) < 0.01
    sampler.set_epoch(1)
    assert list(sampler) != picks and sorted(set(picks)) != list(range(len(picks)))  # redrawn; repeats


def test_one_source_keeps_the_order_it_always_had():
    sampler = EpochShuffle(10, seed=3)
    generator = torch.Generator().manual_seed(3)
    assert list(sampler) == torch.randperm(10, generator=generator).tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": ["c4-train", "alpaca-1k"], "weights": [1]}, "`data.weights` needs one share >= 0 per source (2)"),
        ({"path": [], "weights": None}, "`data.path` must be a source or a list of them"),
        ({"format": "chat"}, "`data.format` must be auto, instruction or text; got 'chat'"),
    ],
)
def test_bad_data_sources(kwargs, message):
    with pytest.raises(LlmpError) as err:
        RecoveryData(**kwargs)
    assert message in str(err.value)


def test_too_little_text_is_a_clear_error(tiny_dir, tmp_path):
    (tmp_path / "short.txt").write_text("a few words only")
    dm = RecoveryData(str(tmp_path / "short.txt"), tokenizer=str(tiny_dir), cutoff_len=64)
    with pytest.raises(LlmpError, match="too little text for one 64-token window"):
        dm.setup()


def test_kd_batches_match_log_softmax_reference():
    """F.kl_div with log targets is KL(target ‖ input) (guards the argument order)."""
    p = torch.randn(3, 7).log_softmax(-1)
    q = torch.randn(3, 7).log_softmax(-1)
    torch.testing.assert_close(F.kl_div(q, p, log_target=True, reduction="sum") / 3, reference_kl(p, q))


# -- the teacher cache ----------------------------------------------------------------------------
def test_teacher_cache_is_written_once_then_stands_in_for_the_teacher(tiny_dir, tmp_path):
    """The first fit writes the top-k cache; a second fit reads it, holds no teacher, and its loss
    equals the one computed from the live teacher; other data is refused."""
    cache = tmp_path / "teacher.safetensors"
    settings = DistillSettings(top_k=8, weight=0.5, cache=str(cache))
    first = RecoveryModule(str(tiny_dir), warmup_steps=1, distill=settings)
    trainer(max_steps=2).fit(first, datamodule=data(tiny_dir))
    assert cache.is_file() and first.teacher is None and first.teacher_cache is not None
    second = RecoveryModule(str(tiny_dir), warmup_steps=1, distill=settings)
    second.load_base()
    assert second.teacher is None  # the cache is there: no teacher loaded
    dm = data(tiny_dir)
    trainer(max_steps=1).fit(second, datamodule=dm)
    batch = batch_of(dm)
    live = Teacher(load_model(str(tiny_dir))[0])
    model = second.model
    with torch.no_grad():
        cached_loss, _ = recovery_loss(model, batch, settings, cache=second.teacher_cache)
        live_loss, _ = recovery_loss(model, batch, settings, live)
    torch.testing.assert_close(cached_loss, live_loss, rtol=2e-3, atol=2e-3)  # float16 logits on disk
    other = RecoveryModule(str(tiny_dir), warmup_steps=1, distill=settings)
    with pytest.raises(LlmpError, match="holds the teacher's logits of other examples or settings"):
        trainer(max_steps=1).fit(other, datamodule=data(tiny_dir, cutoff_len=128))


def test_cache_needs_top_k():
    with pytest.raises(LlmpError, match="`distill.cache` c.safetensors keeps the teacher's top-k logits: set"):
        RecoveryModule("smollm2-135m", distill=DistillSettings(cache="c.safetensors"))


@pytest.mark.parametrize("allocation", ["uniform", "search"])
def test_fit_measures_the_compensated_pruned_model_it_trained(tiny_dir, allocation):
    """`llmp fit`'s `pruned` perplexity is of the model the callback made: with lstsq's refit,
    which replaying the plan alone would lose (a searched allocation searched again, as long)."""
    model, tokenizer = load_model(str(tiny_dir))
    config = PruneConfig(
        ratio=0.3,
        attention="kv",
        criterion="flap",
        compensate="lstsq",
        layerwise=True,
        allocation=allocation,
        search_generations=2,
    )
    tokens = calibration_samples("c4", tokenizer, 4, 32, config.seed)
    record = prune(model, config, tokens)
    record.steps[0].target_ratio = 0.3
    record.calibration = Calibration("c4", 4, 32)
    again = prune_again(load_model(str(tiny_dir))[0], tokenizer, record)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_several_compensated_steps_have_no_untrained_pruned_model(tiny_dir):
    """A schedule's later steps refit a model trained in between: the `pruned` stage has no model
    to measure (a replay without the refit would report a model no step made)."""
    model, tokenizer = load_model(str(tiny_dir))
    config = PruneConfig(ratio=0.3, attention="kv", criterion="flap", compensate="lstsq", layerwise=True)
    record = prune(model, config, calibration_samples("c4", tokenizer, 4, 32, config.seed))
    record.steps.append(record.steps[0])
    assert prune_again(load_model(str(tiny_dir))[0], tokenizer, record) is None
