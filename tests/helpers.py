"""Helpers shared by several test files (test files import from here, never from each other or
from conftest.py, which holds only fixtures): tiny models, folders and tokenizers, and runners.

The callbacks are named by ``class_path: helpers.X`` in recipes of ``llmp fit`` runs started in a
subprocess with ``PYTHONPATH`` set to this folder.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import lightning as L
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import llmp
from llmp import importance, surgery
from llmp.io import save_pruned
from llmp.plan import PlanSettings, element_parameters, make_plan
from llmp.record import PruningRecord
from llmp.structure import adapter_for

DATA = Path(os.environ.get("LLMP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
"""Real public data the task tests read when it is there (zero-shot task files; see its README):
``$LLMP_SHARED_DATA``, by default the workspace's ``shared/data`` beside the checkout. Tests that
need it skip without it."""

# name → (model class, config class, extra config): MHA, GQA, MQA, tied/untied, biases.
TINY = {
    "llama-mha": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False),
    ),
    "llama-mqa": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama-bias": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    ),
    "qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config,
        dict(
            num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1
        ),
    ),
    "mistral": (
        MistralForCausalLM,
        MistralConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
    ),
}


def tiny_model(name: str, layers: int = 4, vocab_size: int = 128, **overrides) -> torch.nn.Module:
    model_cls, config_cls, extra = TINY[name]
    config = config_cls(
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        head_dim=16,
        max_position_embeddings=64,
        **{"intermediate_size": 96, "tie_word_embeddings": True, "hidden_size": 64, **extra, **overrides},
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    # Random init gives near-uniform outputs; larger weights make differences visible in logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


# name → (model class name, config): 8 experts of width 32, top-2; the variants llmp must keep apart.
TINY_MOE = {
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=True)),
    "qwen3_moe-dense": (  # layer 1 a dense MLP, top-k probabilities not renormalised
        "Qwen3MoeForCausalLM",
        dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[1]),
    ),
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False),
    ),
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=8, intermediate_size=32)),
    "olmoe": ("OlmoeForCausalLM", dict(num_experts=8, intermediate_size=32, norm_topk_prob=False)),
    "granitemoe": ("GraniteMoeForCausalLM", dict(num_local_experts=8, intermediate_size=32)),
}
MOE_FAMILIES = tuple(TINY_MOE)


def tiny_moe(name: str, layers: int = 3, vocab_size: int = 128, **overrides) -> torch.nn.Module:
    """A tiny mixture-of-experts model (``TINY_MOE``), weights scaled up as :func:`tiny_model`'s."""
    import transformers

    cls_name, extra = TINY_MOE[name]
    model_cls = getattr(transformers, cls_name)
    settings = dict(
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        eos_token_id=None,
        pad_token_id=None,
        bos_token_id=None,
    )
    config = model_cls.config_class(**{**settings, **extra, **overrides})
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model


def make_tiny_moe_folder(path: Path, family: str = "qwen2_moe", layers: int = 3) -> Path:
    """A tiny MoE model (``TINY_MOE``) with a real byte-level BPE tokenizer, saved as a model folder."""
    tokenizer = tiny_tokenizer()
    tiny_moe(family, layers=layers, vocab_size=len(tokenizer), max_position_embeddings=512).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_tokenizer():
    """A real byte-level BPE tokenizer of 320 tokens, trained on the start of WikiText-2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmp.data.resources import BUILTIN_DATA

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = BUILTIN_DATA["wikitext2"].read_text()[:20000]
    tok.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="Ā", pad_token="Ā")


def tiny_spm_tokenizer():
    """A SentencePiece-style BPE tokenizer (Llama 2's layout: "\u2581" for spaces, byte fallback to
    <0xNN> pieces, BOS added), of 600 pieces trained on the start of WikiText-2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from llmp.data.resources import BUILTIN_DATA

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    text = BUILTIN_DATA["wikitext2"].read_text()[:20000]
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_tiny_folder(path: Path, layers: int = 4) -> Path:
    """A tiny Llama (GQA 4/2) with a real byte-level BPE tokenizer, saved as a model folder."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        head_dim=16,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``llmp ARGV...`` in this process: exit code, stdout, stderr."""
    from llmp.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def prune_and_mask(model, kinds, share=0.5, criterion="taylor", calib=None, reduction="sum", plan=None):
    """(pruned copy, masked copy, plan) for the same removal: ``share`` of what the groups can give."""
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    adapter = adapter_for(pruned)
    structure = adapter.discover(pruned, kinds)
    if plan is None:
        scores = importance.score(pruned, structure, calib, criterion, reduction)
        params = {g.name: element_parameters(g, pruned) for g in structure.groups}
        most = sum(int(params[g.name].sort().values[: g.size - g.blocks].sum()) for g in structure.groups)
        plan = make_plan(structure.groups, scores, params, int(share * most), PlanSettings())
    surgery.mask(masked, adapter.discover(masked, kinds), plan, adapter)
    surgery.apply(pruned, structure, plan, adapter)
    return pruned, masked, plan


def blank_record(model: str = "x") -> PruningRecord:
    """A record for a folder saved without pruning (it marks the folder as llmp's)."""
    return PruningRecord(family="llama", params_before=1, params_after=1, model=model)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def recipe_file(
    tiny_dir,
    tmp_path,
    mode="lora",
    schedule=None,
    single_device=True,
    callbacks=(),
    name="recipe.yaml",
    pruning=None,
    **sections,
) -> Path:
    """A `llmp fit` recipe for the tiny model: 2 epochs of 2 batches, KV groups and MLP channels
    pruned to 30% of layers 0-3 (``schedule``: at fit start, or ``{epoch: ratio}``).

    ``sections`` merge into the recipe's sections (``model={...}``, ``eval={...}``) or set a
    top-level key (``output=...``). ``single_device``: one CPU process (no launcher).
    ``callbacks``: more Trainer callbacks (``{"class_path": ..., "init_args": ...}``), before the pruning.
    ``pruning``: more PruneConfig settings (``{"criterion": "flap"}``)."""
    config = {"ratio": 0.3, "attention": "kv", "layers": "0:4", **(pruning or {})}
    pruning = {"config": config, "num_samples": 2, "seq_len": 16}
    trainer = {
        "default_root_dir": str(tmp_path),
        "max_epochs": 2,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [
            *callbacks,
            {"class_path": "llmp.callbacks.StructuredPruning", "init_args": {**pruning, "schedule": schedule}},
        ],
    }
    if single_device:
        trainer.update(accelerator="cpu", devices=1)
    recipe = {
        "model": {"model": str(tiny_dir), "mode": mode, "learning_rate": 0.001, "warmup_steps": 1},
        "trainer": trainer,
        "data": {"path": "alpaca-1k", "max_samples": 24, "val_size": 4, "cutoff_len": 192, "batch_size": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = str(value) if isinstance(value, Path) else value
    path = Path(tmp_path) / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def recipe(tiny_dir, tmp_path, **overrides) -> list[str]:
    """`llmp fit` arguments for the tiny model (an iterative schedule, one process)."""
    config = recipe_file(
        tiny_dir,
        tmp_path,
        schedule={0: 0.1, 1: 0.3},
        model={"lora": {"dropout": 0.0}},  # dropout draws from the global RNG, which a resume does not restore
        eval={"data": None},
    )
    return ["--config", str(config), *[f"--{k}={v}" for k, v in overrides.items()]]


class StopAfterEpoch(L.Callback):
    """Ends a fit after ``epoch`` as an interruption would, without changing its LR schedule."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = trainer.current_epoch >= self.epoch


class HangAtEpoch(L.Callback):
    """Announces the start of ``epoch`` (its checkpoint before it is on disk) and waits to be killed."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            import time

            print("HANGING", flush=True)
            time.sleep(600)


class PauseAtEpoch(L.Callback):
    """Announces the start of ``epoch`` and waits (up to a minute) until Lightning has seen a SIGTERM,
    as a long training step would; the loop then stops at the step's end."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            import time

            print("PAUSED", flush=True)
            for _ in range(600):
                if trainer.received_sigterm:
                    return
                time.sleep(0.1)


class FillDisk(L.Callback):
    """At the end of training, fills the file system of ``folder`` up to its last 16 KiB (another
    process's files arriving while the fit ran)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        import shutil

        if not trainer.is_global_zero:  # one writer: another rank's truncating open would empty the file
            return
        free = shutil.disk_usage(self.folder).free
        with open(f"{self.folder}/filler", "wb") as f:
            f.write(b"0" * max(0, free - (16 << 10)))


class HangWritingCheckpoint(L.Callback):
    """While epoch ``epoch``'s checkpoint is written, stops halfway through its bytes and waits to be killed."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.current_epoch != self.epoch:
            return
        import time

        from fsspec.implementations.local import LocalFileOpener

        def half_then_hang(opener, data):
            opener.f.write(data[: len(data) // 2])
            opener.f.flush()
            print("HANGING", flush=True)
            time.sleep(600)

        LocalFileOpener.write = half_then_hang


# Llama-layout families that `llmp export` takes (tests/test_export.py, tests/test_llamacpp.py).
FAMILIES = ("llama-gqa", "llama-mha", "llama-bias", "qwen2", "mistral")


def pruned_folder(
    path,
    name="llama-gqa",
    attention="query",
    compensate="none",
    tokenizer=None,
    ratio=0.3,
    model_kwargs=None,
    **settings,
):
    """A tiny model of ``name`` pruned heterogeneously (a global ranking), saved with a tokenizer."""

    tokenizer = tokenizer or tiny_tokenizer()
    model = tiny_model(name, vocab_size=len(tokenizer), sliding_window=None, **(model_kwargs or {}))
    calib = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(1))
    config = llmp.PruneConfig(
        ratio=ratio,
        attention=attention,
        ranking="global",
        layers="0:4",
        criterion="flap" if compensate != "none" else "l2",
        compensate=compensate,
        **settings,
    )
    record = llmp.prune(model, config, calib)
    save_pruned(model, path, tokenizer, record)
    return path, model, tokenizer
