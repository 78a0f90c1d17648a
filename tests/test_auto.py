"""Automatic discovery: families llmp has no adapter for, treated as unknown.

What it maps must equal the hand-written adapter (Llama) and pass masked == pruned on several real
layouts (fused QKV, interleaved per-head QKV, per-head q/k norms); what it cannot map is refused
by module name, and a wrong map is caught at run time by the equivalence check.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from helpers import tiny_model
from torch import nn
from torch.nn import functional as F

from llmp import LlmpError, PruneConfig, load_pruned, prune, save_pruned, surgery
from llmp.structure import Kind, adapter_for
from llmp.structure.auto import AutoAdapter
from llmp.verify import random_plan, verify

ALL = (Kind.QUERY_HEADS, Kind.KV_GROUPS, Kind.MLP, Kind.HIDDEN, Kind.LAYERS)
COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96)
# Real transformers architectures, run through the automatic path as if llmp did not know them.
ARCHS = {
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(num_key_value_heads=2, pad_token_id=0)),  # fused qkv, gate_up
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=16)),  # per-head q/k norms
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict()),  # per-head interleaved qkv, LayerNorm
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(num_key_value_heads=2, head_dim=16)),  # (1 + w) RMSNorm
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, dict(num_key_value_heads=2)),  # q/k norms across heads
}
VERIFIED = {
    "phi3": (Kind.MLP, Kind.HIDDEN, Kind.LAYERS),
    "qwen3": ALL,
    "gpt_neox": (Kind.QUERY_HEADS, Kind.MLP, Kind.LAYERS),
    "gemma": ALL,
    "olmo2": (Kind.MLP, Kind.HIDDEN, Kind.LAYERS),
}


def arch(name: str) -> nn.Module:
    config_cls, model_cls, extra = ARCHS[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**COMMON, "max_position_embeddings": 64, **extra})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def pruned_and_masked(model, kinds, adapter=None):
    adapter = adapter or AutoAdapter()
    structure = adapter.discover(model, kinds)
    plan = random_plan(structure, seed=1)
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    surgery.mask(masked, structure, plan, adapter)
    surgery.apply(pruned, structure, plan, adapter)
    return pruned, masked, plan


def as_sets(structure):
    return [(g.name, g.kind, g.size, g.blocks, set(g.slices), g.modules) for g in structure.groups]


@pytest.mark.parametrize("kind", ALL, ids=lambda k: k.value)
def test_discovered_groups_equal_the_llama_adapter(tiny, kind):
    _, model = tiny
    assert as_sets(AutoAdapter().discover(model, (kind,))) == as_sets(adapter_for(model).discover(model, (kind,)))


@pytest.mark.parametrize(
    ("name", "kind"), [(n, k) for n, kinds in VERIFIED.items() for k in kinds], ids=lambda x: getattr(x, "value", x)
)
def test_pruned_equals_masked_on_unknown_families(name, kind, inputs):
    model = arch(name)
    pruned, masked, plan = pruned_and_masked(model, (kind,))
    assert plan
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(pruned(inputs).logits, masked(inputs).logits, atol=2e-5, rtol=1e-4)


def test_fused_and_interleaved_index_maps():
    """Phi-3 fuses [q | k | v] rows; GPT-NeoX interleaves [q_h k_h v_h] per head (view then split)."""
    phi3 = AutoAdapter().discover(arch("phi3"), (Kind.KV_GROUPS,))["layers.0.kv_groups"]
    qkv = {s.offset: s for s in phi3.slices if s.param.endswith("qkv_proj.weight")}
    # 4 query heads, 2 KV heads, head_dim 16: KV group g = q rows 32g.., k rows 64+16g.., v rows 96+16g..
    assert {o: (s.width, s.stride) for o, s in qkv.items()} == {0: (32, None), 64: (16, None), 96: (16, None)}
    neox = AutoAdapter().discover(arch("gpt_neox"), (Kind.KV_GROUPS,))["layers.0.kv_groups"]
    rows = sorted((s.offset, s.width, s.stride) for s in neox.slices if s.param.endswith("query_key_value.weight"))
    assert rows == [(0, 48, None)]  # head h = rows [48h, 48h + 48): its q, k and v together


def test_refusals_name_the_module():
    olmo2 = arch("olmo2")
    with pytest.raises(LlmpError, match=r"q_norm` pools channels of several.*docs/adapters.md"):
        AutoAdapter().discover(olmo2, (Kind.QUERY_HEADS,))
    with pytest.raises(LlmpError, match=r"input_layernorm` \(LayerNorm\) normalises the residual stream"):
        AutoAdapter().discover(arch("gpt_neox"), (Kind.HIDDEN,))


def test_config_dependent_forward_is_caught_at_run_time():
    """Phi-3 slices q/k/v with the config's head count: one config cannot hold per-layer counts."""
    model = arch("phi3")
    adapter = AutoAdapter()
    with pytest.raises(LlmpError, match="equivalence check failed.*query_heads.*docs/adapters.md"):
        verify(model, adapter.discover(model, (Kind.QUERY_HEADS,)), adapter)
    verify(model, adapter.discover(model, (Kind.MLP, Kind.HIDDEN)), adapter)  # what it can do still passes


def test_eager_attention_is_traced_as_sdpa(calib, inputs):
    """A model loaded with `attn_implementation="eager"` is discovered as with sdpa, and pruned
    (the equivalence check runs the eager forward); the setting is left as it was."""
    model = arch("qwen3")
    model.set_attn_implementation("eager")
    expected = AutoAdapter().discover(arch("qwen3"), ALL)
    assert [g.name for g in AutoAdapter().discover(model, ALL).groups] == [g.name for g in expected.groups]
    assert model.config._attn_implementation == "eager"
    report = prune(model, PruneConfig(ratio=0.2, attention="query"), calib)
    assert report.family == "auto" and model.config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.isfinite(model(inputs).logits).all()


def test_prune_refuses_an_unknown_family_that_fails_the_check():
    """`llmp.prune` itself runs the check on a model it has not seen, before touching a weight."""
    model = arch("phi3")
    model.config.model_type = "phi3-like"  # no adapter: the automatic path, as for a new family
    assert isinstance(adapter_for(model), AutoAdapter)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(LlmpError, match="equivalence check failed.*query_heads"):
        prune(model, PruneConfig(ratio=0.1, attention="query", mlp=False, criterion="l1"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    report = prune(model, PruneConfig(ratio=0.1, attention="none", criterion="l1"))  # MLP passes the check
    assert report.family == "auto" and report.achieved_ratio > 0.05


def test_wrong_map_is_caught_by_the_check():
    model = tiny_model("llama-gqa")
    adapter = AutoAdapter()
    structure = adapter.discover(model, (Kind.QUERY_HEADS,))
    group = structure.groups[1]
    # Shift the query rows by one head: every removal now takes another head's queries.
    group.slices = tuple(
        dataclasses.replace(s, starts=(16, 32, 48, 64, 80, 0)) if s.param.endswith("q_proj.weight") else s
        for s in group.slices
    )
    with pytest.raises(LlmpError, match="equivalence check failed.*query_heads"):
        verify(model, structure, adapter)


def test_unknown_family_prunes_saves_and_loads(calib, inputs, tmp_path):
    model = arch("qwen3")  # no adapter registers qwen3: llmp.prune takes the automatic path
    assert isinstance(adapter_for(model), AutoAdapter)
    report = prune(model, PruneConfig(ratio=0.15, attention="query", layers="0:3", ranking="global"), calib)
    assert report.family == "auto" and report.params_after < report.params_before
    assert len({tuple(s.values()) for s in report.layer_shapes}) > 1  # counts differ across layers
    out = save_pruned(model, tmp_path / "pruned", record=report)
    loaded = load_pruned(out)
    torch.testing.assert_close(loaded(inputs).logits, model(inputs).logits, rtol=0, atol=0)
    gen = loaded.generate(inputs[:1, :6], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 9)


def test_layer_and_hidden_pruning_of_unknown_family(calib, inputs):
    for config in (PruneConfig(ratio=0.3, scope="layer"), PruneConfig(ratio=0.1, scope="channel")):
        model = arch("gemma")
        model.config.model_type = "unknown-gemma"  # force the automatic path
        reference = copy.deepcopy(model)
        prune(model, config, calib)
        assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in reference.parameters())
        assert model(inputs).logits.shape == reference(inputs).logits.shape


# -- a tiny decoder written here, with the odd ops discovery must map or refuse ------------------
class Norm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.rand(d) + 0.5), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight


class Block(nn.Module):
    def __init__(self, d, heads, mode):
        super().__init__()
        self.heads, self.head_dim, self.mode = heads, d // heads, mode
        self.norm1, self.norm2 = Norm(d), Norm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.gate_scale = nn.Linear(d, d, bias=False)
        self.register_buffer("perm", torch.arange(heads).flip(0), persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.mode == "gather":  # query heads reversed: output head i is query head n - 1 - i
            q = q.index_select(1, torch.arange(q.shape[1]).flip(0))
        if self.mode == "gather_buffer":  # the same with a fixed index, which pruning does not slice
            q = q.index_select(1, self.perm)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        if self.mode == "two_consumers":  # v also read by a second projection
            y = y + self.gate_scale(v.transpose(1, 2).reshape(b, t, -1))
        x = x + self.o(y)
        a, g = self.up(self.norm2(x)).chunk(2, dim=-1)  # fused up|gate, chunked
        inner = F.gelu(g) * a
        if self.mode == "fft":
            inner = torch.fft.fft(inner).real
        return x + self.down(inner)


class TinyDecoder(nn.Module):
    def __init__(self, mode="plain", d=32, heads=4, layers=2, vocab=64):
        super().__init__()
        self.config = T.PretrainedConfig(hidden_size=d, num_hidden_layers=layers, vocab_size=vocab)
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, mode) for _ in range(layers))
        self.norm, self.head = Norm(d), nn.Linear(d, vocab, bias=False)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.3)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=None):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return SimpleNamespace(logits=self.head(self.norm(x)))


@pytest.mark.parametrize("mode", ["plain", "gather"])
def test_custom_decoder_maps_through_chunk_and_gather(mode):
    model = TinyDecoder(mode).eval()
    inputs = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    adapter = AutoAdapter()
    heads = adapter.discover(model, (Kind.KV_GROUPS,)).groups[0]
    q = next(s for s in heads.slices if s.param == "blocks.0.q.weight")
    o = next(s for s in heads.slices if s.param == "blocks.0.o.weight")
    if mode == "gather":  # output head i is query head 3 - i: a table no offset/stride can say
        assert q.starts == (24, 16, 8, 0) and o.offset == 0 and o.starts is None
    for kind in ALL:
        pruned, masked, plan = pruned_and_masked(model, (kind,), adapter)
        assert plan, kind
        torch.testing.assert_close(pruned(inputs).logits, masked(inputs).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("mode", "kind", "message"),
    [
        ("two_consumers", Kind.QUERY_HEADS, r"`blocks.0.v` output is read by two consumers.*`blocks.0.gate_scale`"),
        ("fft", Kind.MLP, r"`blocks.0.up` output goes through `fft_fft` in `blocks.0`"),
    ],
)
def test_what_it_cannot_map_is_refused_by_module(mode, kind, message):
    model = TinyDecoder(mode).eval()
    with pytest.raises(LlmpError, match=message + r".*see docs/adapters.md"):
        AutoAdapter().discover(model, (kind,))


def test_gather_by_a_fixed_index_is_mapped_but_refused_by_the_check():
    """The map through the gather is exact, but its index (a buffer) would not follow the pruning."""
    model = TinyDecoder("gather_buffer").eval()
    adapter = AutoAdapter()
    structure = adapter.discover(model, (Kind.KV_GROUPS,))
    assert next(s for s in structure.groups[0].slices if s.param == "blocks.0.q.weight").starts == (24, 16, 8, 0)
    with pytest.raises(LlmpError, match="equivalence check failed.*kv_groups.*blocks.0"):
        verify(model, structure, adapter)
    verify(model, adapter.discover(model, (Kind.MLP, Kind.HIDDEN, Kind.LAYERS)), adapter)
