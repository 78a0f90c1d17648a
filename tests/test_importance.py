"""Importance scores match their definitions, however the calibration is batched."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from llmp import importance
from llmp.importance import ScoringSettings, checkpointing
from llmp.importance.loss import loss_chunk
from llmp.structure import Kind, adapter_for

LOSS_CHUNK_BYTES = ScoringSettings().loss_chunk_bytes


def test_taylor_matches_its_definition(calib):
    model = tiny_model("llama-gqa")
    structure = adapter_for(model).discover(model, (Kind.MLP,))
    scores = importance.score(model, structure, calib, "taylor")
    model.zero_grad()
    model(input_ids=calib, labels=calib).loss.backward()
    mlp = model.model.layers[2].mlp
    expected = sum(
        (w.weight * w.weight.grad).abs().sum(dim)
        for w, dim in ((mlp.gate_proj, 1), (mlp.up_proj, 1), (mlp.down_proj, 0))
    )
    torch.testing.assert_close(scores["layers.2.mlp"], expected.double(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("criterion", ["taylor", "vectorwise"])
def test_batching_does_not_change_scores(calib, criterion):
    model = tiny_model("llama-gqa")
    structure = adapter_for(model).discover(model, (Kind.QUERY_HEADS, Kind.MLP))
    one = importance.score(model, structure, calib, criterion, batch_size=len(calib))
    many = importance.score(model, structure, calib, criterion, batch_size=1)
    for name in one:
        torch.testing.assert_close(one[name], many[name], rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind


def test_second_order_is_the_fisher_term(calib):
    model = tiny_model("llama-mha")
    structure = adapter_for(model).discover(model, (Kind.MLP,))
    scores = importance.score(model, structure, calib, "taylor2")
    mlp = model.model.layers[0].mlp
    parts = ((mlp.gate_proj.weight, 1), (mlp.up_proj.weight, 1), (mlp.down_proj.weight, 0))
    fisher = [torch.zeros_like(w) for w, _ in parts]
    for sample in calib:
        model.zero_grad()
        model(input_ids=sample[None], labels=sample[None]).loss.backward()
        for f, (w, _) in zip(fisher, parts, strict=True):
            f += w.grad**2 / len(calib)
    expected = sum((w.detach() ** 2 * f).sum(dim) for f, (w, dim) in zip(fisher, parts, strict=True))
    torch.testing.assert_close(scores["layers.0.mlp"], expected.double(), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("criterion", ["taylor", "taylor2"])
@pytest.mark.parametrize("budget", [0, 1 << 40], ids=["full", "selective"])
def test_checkpointing_does_not_change_scores(calib, criterion, budget):
    model = tiny_model("llama-gqa")
    structure = adapter_for(model).discover(model, (Kind.KV_GROUPS, Kind.MLP))
    settings = ScoringSettings(activation_budget=budget)
    full, selective = checkpointing.plan(model, structure, calib.numel(), settings)
    assert len(full if budget == 0 else selective) == len(model.model.layers) - 1  # the last one: neither
    plain = importance.score(model, structure, calib, criterion, settings=ScoringSettings(checkpointing=False))
    kept = importance.score(model, structure, calib, criterion, settings=settings)
    for name in plain:
        torch.testing.assert_close(plain[name], kept[name], rtol=1e-5, atol=1e-12)
    assert "forward" not in vars(model.model.layers[0])  # the layers' own forward again


def test_selective_checkpointing_fills_the_budget_from_the_top(calib):
    model = tiny_model("llama-gqa")
    layers = model.model.layers
    structure = adapter_for(model).discover(model, (Kind.MLP,))
    structure.groups = [g for g in structure.groups if g.layer >= 1]  # layer 0 is not scored
    linears = [m for m in layers[0].modules() if isinstance(m, torch.nn.Linear)]
    tokens = 4096  # enough that two layers' worth is an absolute budget (over a quarter of the weights)
    per_layer = tokens * 4 * sum(m.out_features for m in linears[:-1])  # the last one's output: not kept
    settings = ScoringSettings(activation_budget=2 * per_layer)
    full, selective = checkpointing.plan(model, structure, tokens, settings)
    n = len(layers)
    assert selective == [layers[n - 2], layers[n - 3]]  # the last layer is not checkpointed at all
    assert full == list(layers[1 : n - 3])  # layer 0 needs no gradient: not checkpointed


def test_a_big_models_budget_is_a_share_of_its_weights(calib):
    model = tiny_model("llama-gqa")
    layers = model.model.layers
    structure = adapter_for(model).discover(model, (Kind.MLP,))
    linears = [m for m in layers[0].modules() if isinstance(m, torch.nn.Linear)]
    tokens = 64
    per_layer = tokens * 4 * sum(m.out_features for m in linears[:-1])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for layers_worth in (0, 1, 2):  # the model is "big": over four budgets of one byte
        share = weights // (layers_worth * per_layer + per_layer // 2)
        settings = ScoringSettings(activation_budget=1, activation_share=share)
        full, selective = checkpointing.plan(model, structure, tokens, settings)
        assert len(selective) == layers_worth and len(full) == len(layers) - 1 - layers_worth
    # bf16: a layer keeps half the bytes; the budget is half the share of half the bytes (a quarter).
    model.to(torch.bfloat16)
    settings = ScoringSettings(activation_budget=1, activation_share=weights // (2 * per_layer + per_layer // 2))
    assert len(checkpointing.plan(model, structure, tokens, settings)[1]) == 1


class _CountProducts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.products += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
def test_selective_checkpointing_recomputes_no_product(calib, family):
    """With every layer selective, scoring runs exactly the matrix products that it runs without
    checkpointing: the backward recomputes no projection (the counter does see full checkpointing's)."""
    model = tiny_model(family)
    structure = adapter_for(model).discover(model, (Kind.KV_GROUPS, Kind.MLP))
    counts = {}
    for budget, recompute in ((0, False), (1 << 40, True), (0, True)):
        settings = ScoringSettings(checkpointing=recompute, activation_budget=budget)
        with _CountProducts() as counter:
            importance.score(model, structure, calib, "taylor", settings=settings)
        counts[budget, recompute] = counter.products
    assert counts[1 << 40, True] == counts[0, False] < counts[0, True]


def test_bf16_weights_are_scored_in_float32(calib):
    model = tiny_model("llama-gqa")
    structure = adapter_for(model).discover(model, (Kind.MLP,))
    half = tiny_model("llama-gqa").to(torch.bfloat16)
    exact = importance.score(model, structure, calib, "l2")
    rounded = importance.score(half, adapter_for(half).discover(half, (Kind.MLP,)), calib, "l2")
    assert all(s.dtype == torch.float64 for s in rounded.values())
    for name in exact:  # only the bf16 rounding of the weights themselves differs
        torch.testing.assert_close(exact[name], rounded[name], rtol=2e-2, atol=0)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())  # no float32 copy kept


def test_chunked_calibration_loss_is_the_model_loss(calib):
    """The head runs on a few tokens at a time; the loss and every gradient are the model's own."""
    model = tiny_model("llama-gqa")
    settings = ScoringSettings(loss_chunk_bytes=0)  # chunks of 16 tokens at most: several
    plain = model(input_ids=calib, labels=calib, use_cache=False).loss
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = importance.calibration_loss(model, calib, settings)
    chunked.backward()
    torch.testing.assert_close(chunked, plain)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-7)
    assert "forward" not in vars(model.lm_head)  # the head's own forward again


def test_loss_chunks_are_even_and_within_their_bytes():
    """As few chunks as the logits' bytes allow, of sizes that differ by one token at most."""
    budget = LOSS_CHUNK_BYTES
    assert loss_chunk(630, 49152, budget) == 315  # SmolLM2's 10 x 64 tokens: 2 of 315, not 341 + 289
    assert loss_chunk(2032, 49152, budget) == 339  # 16 x 128: 6 chunks
    assert loss_chunk(10, 49152, budget) == 10
    for tokens in (1, 15, 16, 17, 60, 631, 4096):
        for vocab in (128, 32000, 128256):
            chunk = loss_chunk(tokens, vocab, budget)
            most = max(16, budget // (4 * vocab))
            assert chunk <= most and -(-tokens // chunk) == -(-tokens // most)
    # bf16: 32 MiB for its logits and their float32 copy, 6 bytes a logit (174 tokens of a 32k vocabulary)
    assert loss_chunk(2032, 32000, budget, 2) == 170 and loss_chunk(2032, 32000, budget) == 508
    assert loss_chunk(2032, 49152, budget, copies=3) == 113  # a scored head under autograd: 3 copies
    assert loss_chunk(60, 128, 0) == 15 and loss_chunk(17, 128, 0) == 9  # 16 at most


def _taylor_by_definition(model, structure, calib) -> dict[str, torch.Tensor]:
    """Σ|w·g| per group element from ``.grad`` of the mean loss, the textbook way."""
    model.zero_grad()
    model(input_ids=calib, labels=calib).loss.backward()
    params = dict(model.named_parameters())
    out = {}
    for group in structure.groups:
        elements = torch.arange(group.size)
        total = torch.zeros(group.size, dtype=torch.float64)
        for s in group.slices:
            p = params[s.param]
            sal = (p.detach().float() * p.grad.float()).abs()
            per = sal.sum(dim=[d for d in range(sal.dim()) if d != s.dim]) if sal.dim() > 1 else sal
            total += per[s.indices(elements)].view(group.size, s.width).sum(1).double()
        out[group.name] = total
    model.zero_grad()
    return out


@pytest.mark.parametrize("name", ["llama-gqa", "llama-bias", "qwen2"])
def test_linear_scores_from_the_backward_equal_the_gradient_definition(calib, name):
    """Linear weights are scored from (x, dy) in the backward, biases and norms from ``.grad``:
    the scores are the ones the summed gradient gives, and no Linear weight gets a ``.grad``."""
    model = tiny_model(name)
    structure = adapter_for(model).discover(model, (Kind.QUERY_HEADS, Kind.MLP))
    accumulated = []
    linears = [m.weight for m in model.modules() if type(m) is torch.nn.Linear and m is not model.lm_head]
    hooks = [w.register_post_accumulate_grad_hook(lambda p: accumulated.append(p.grad)) for w in linears]
    scores = importance.score(model, structure, calib, "taylor")
    for hook in hooks:
        hook.remove()
    assert all(g is None for g in accumulated)  # no weight gradient was ever made for them
    expected = _taylor_by_definition(model, structure, calib)
    for group in structure.groups:
        torch.testing.assert_close(scores[group.name], expected[group.name], rtol=1e-4, atol=1e-9)


def test_bf16_taylor_scores_follow_the_bf16_gradients(calib):
    model = tiny_model("llama-gqa").to(torch.bfloat16)
    structure = adapter_for(model).discover(model, (Kind.KV_GROUPS, Kind.MLP))
    scores = importance.score(model, structure, calib, "taylor")
    expected = _taylor_by_definition(model, structure, calib)
    for name in scores:
        assert scores[name].dtype == torch.float64
        torch.testing.assert_close(scores[name], expected[name], rtol=2e-2, atol=1e-6)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_head_loss_is_cross_entropy_and_its_gradient(dtype, bias):
    """The fused head loss: the summed cross-entropy and its gradient for the hidden states, made
    a chunk at a time (here 16 tokens: three chunks, one partial)."""
    from llmp.head import head_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 100, bias=bias).to(dtype).requires_grad_(False)
    hidden = torch.randn(45, 32, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 100, (45,))
    plain = torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")
    (expected,) = torch.autograd.grad(plain * 0.3, hidden)
    fused = head_loss(head, hidden, labels, chunk=16)
    (grad,) = torch.autograd.grad(fused * 0.3, hidden)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-4)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=1e-3)
    torch.testing.assert_close(grad, expected, **tol)
    head.weight.requires_grad_(True)
    assert head_loss(head, hidden, labels, chunk=16) is None  # the head is scored: autograd runs it


def test_fused_calibration_loss_gives_the_model_gradients(calib):
    """With the head frozen (its weights are not pruned) the loss's gradients are the model's own."""
    model = tiny_model("llama-gqa")
    settings = ScoringSettings(loss_chunk_bytes=0)  # chunks of 16 tokens at most: several
    model.lm_head.requires_grad_(False)
    model.model.embed_tokens.requires_grad_(False)
    plain = model(input_ids=calib, labels=calib, use_cache=False).loss
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    fused = importance.calibration_loss(model, calib, settings)
    fused.backward()
    torch.testing.assert_close(fused, plain)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-7)
