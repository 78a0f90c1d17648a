"""Checks every family adapter must pass, shared by the ``test_family_*.py`` files.

Each takes a tiny random model and asserts, never prints:

- :func:`check_pruned_equals_masked`: physically removing a plan's elements gives the logits of the
  model with those elements' writes zeroed, and the smaller model still generates with its cache;
- :func:`check_prune_save_load`: ``llmp.prune`` end to end, then ``save_pruned`` → ``load_pruned``
  gives identical logits.
"""

from __future__ import annotations

import torch
from helpers import n_params, prune_and_mask

from llmp import PruneConfig, load_pruned, prune, save_pruned
from llmp.record import PruningRecord, read_record
from llmp.structure import Kind

TOL = dict(atol=2e-5, rtol=1e-4)
TOKENS = dict(pad_token_id=0, bos_token_id=None, eos_token_id=None)
"""Special tokens for tiny configs: in the 128-word vocabulary, and no end token to stop ``generate`` early."""


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Larger matrices (visible differences in logits) and random norm weights and biases.

    Random 1-D parameters make every norm weight and bias matter, so a slice that misses one shows.
    """
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
            else:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def check_generates(model: torch.nn.Module, inputs: torch.Tensor) -> None:
    """``generate`` runs, and incremental decoding with the KV cache matches a full forward."""
    with torch.no_grad():
        out = model.generate(inputs[:1, :8], max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 12)
        full = model(out[:, :-1]).logits[0, -1].argmax()
    assert int(out[0, -1]) == int(full)


def check_pruned_equals_masked(model, kind: Kind, calib, inputs, share: float = 0.5) -> dict:
    """Prune ``share`` of what ``kind`` can give; pruned logits must equal masked logits."""
    pruned, masked, plan = prune_and_mask(model, (kind,), share, calib=calib)
    assert plan, f"nothing planned for {kind}"
    assert n_params(pruned) < n_params(model)
    with torch.no_grad():
        torch.testing.assert_close(pruned(inputs).logits, masked(inputs).logits, **TOL)
    check_generates(pruned, inputs)
    return plan


def check_prune_save_load(model, config: PruneConfig, calib, inputs, tmp_path) -> PruningRecord:
    """``llmp.prune`` removes parameters; the saved folder loads back with identical logits (and
    its record reads back)."""
    report = prune(model, config, calib)
    assert report.params_after < report.params_before
    out = save_pruned(model, tmp_path / "pruned", record=report)
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    loaded = load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs).logits, model(inputs).logits, rtol=0, atol=0)
    assert n_params(loaded) == report.params_after
    check_generates(loaded, inputs)
    saved = read_record(out)
    assert saved.steps == report.steps and saved.layer_shapes == report.layer_shapes
    return saved
