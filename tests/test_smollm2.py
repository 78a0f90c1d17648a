"""The real SmolLM2-135M: prune, save, load, generate (slow: ~1 minute on 2 cores)."""

from __future__ import annotations

import pytest
import torch

from llmp import PruneConfig, load_pruned, prune, save_pruned
from llmp.data import calibration_samples, read_text
from llmp.data.resources import BUILTIN_DATA
from llmp.eval import perplexity

pytestmark = pytest.mark.slow


def test_prune_save_load_generate(smollm2, tmp_path):
    model, tokenizer = smollm2
    calib = calibration_samples(BUILTIN_DATA["c4"], tokenizer, 8, 64)
    report = prune(model, PruneConfig(ratio=0.2, attention="query", layers="4:26"), calib)
    assert abs(report.achieved_ratio - 0.2) <= 0.01
    assert all(s["heads"] % s["kv_heads"] == 0 for s in report.layer_shapes)
    out = save_pruned(model, tmp_path / "smol", tokenizer, report)
    loaded = load_pruned(out)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    generated = loaded.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 0
    ppl = perplexity(loaded, tokenizer, read_text(BUILTIN_DATA["wikitext2"]), 128, 2048).ppl
    assert 20 < ppl < 1000  # dense is ~52 on this text; a broken head mapping gives thousands
