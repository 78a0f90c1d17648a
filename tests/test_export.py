"""`llmp export`: GGUF (llama.cpp `deci`) and DeciLM (vLLM) files of pruned tiny models.

The GGUF is checked by re-reading it with the `gguf` package here, and against llama.cpp itself
in tests/test_llamacpp.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAMILIES, logits, pruned_folder, recipe, run_cli, tiny_model, tiny_tokenizer

import llmp
from llmp.errors import LlmpError
from llmp.export import export
from llmp.export.gguf import REPORT_KEY, read_metadata, rope_pairs
from llmp.io import load_pruned


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("name", FAMILIES)
def test_gguf_holds_every_layers_own_counts_and_the_weights(tmp_path, tokenizer, name):
    folder, model, _ = pruned_folder(tmp_path / "p", name, tokenizer=tokenizer)
    shapes = [(s["heads"], s["kv_heads"], s["mlp"]) for s in llmp.structure.adapter_for(model).layer_shapes(model)]
    assert len(set(shapes)) > 1, "the test needs a heterogeneous model"
    out = export(folder, "gguf", tmp_path / "p.gguf", dtype="f32")
    meta = dict(read_metadata(out.path))
    assert meta["general.architecture"] == "deci"
    assert list(zip(meta["deci.attention.head_count"], meta["deci.attention.head_count_kv"],
                    meta["deci.feed_forward_length"], strict=True)) == shapes  # fmt: skip
    assert meta["deci.block_count"] == 4 and meta["deci.attention.key_length"] == 16
    assert json.loads(meta[REPORT_KEY])["layer_shapes"][0]["heads"] == shapes[0][0]

    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(out.path).tensors}
    state = model.state_dict()
    for i, (heads, kv, _) in enumerate(shapes):
        attn = f"model.layers.{i}.self_attn."
        q = torch.from_numpy(tensors[f"blk.{i}.attn_q.weight"].data.copy())
        k = torch.from_numpy(tensors[f"blk.{i}.attn_k.weight"].data.copy())
        torch.testing.assert_close(q, rope_pairs(state[attn + "q_proj.weight"], heads))
        torch.testing.assert_close(k, rope_pairs(state[attn + "k_proj.weight"], kv))
        torch.testing.assert_close(
            torch.from_numpy(tensors[f"blk.{i}.ffn_down.weight"].data.copy()),
            state[f"model.layers.{i}.mlp.down_proj.weight"],
        )
    biased = name in ("llama-bias", "qwen2")
    assert ("blk.1.attn_q.bias" in tensors) == biased
    assert "output.weight" in tensors if not model.config.tie_word_embeddings else "output.weight" not in tensors


def test_rope_pairs_moves_each_half_next_to_its_partner():
    d, heads = 8, 2
    rows = torch.arange(heads * d, dtype=torch.float32).unsqueeze(1)
    out = rope_pairs(rows, heads).squeeze(1).tolist()
    assert out[:d] == [0, 4, 1, 5, 2, 6, 3, 7]  # channel i beside channel i + d/2, head by head
    assert out[d:] == [8, 12, 9, 13, 10, 14, 11, 15]


def test_compensation_biases_travel(tmp_path, tokenizer):
    folder, _, _ = pruned_folder(tmp_path / "p", compensate="bias", attention="query", tokenizer=tokenizer)
    import gguf

    names = {t.name for t in gguf.GGUFReader(export(folder, "gguf", tmp_path / "p.gguf").path).tensors}
    assert {"blk.1.attn_output.bias", "blk.1.ffn_down.bias"} <= names


def test_tokenizer_goes_into_the_file(tmp_path, tokenizer):
    folder, _, _ = pruned_folder(tmp_path / "p", tokenizer=tokenizer)
    meta = dict(read_metadata(export(folder, "gguf", tmp_path / "p.gguf").path))
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert len(meta["tokenizer.ggml.merges"]) > 0
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.parametrize(("dtype", "kind"), [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_dtypes(tmp_path, tokenizer, dtype, kind):
    folder, _, _ = pruned_folder(tmp_path / "p", tokenizer=tokenizer, round_to=32 if dtype == "q8_0" else 1)
    import gguf

    out = export(folder, "gguf", tmp_path / "p.gguf", dtype=dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out.path).tensors}
    assert types["blk.1.attn_q.weight"] == kind and types["blk.1.attn_norm.weight"] == "F32"
    assert out.details["f16_fallback"] == []


def test_q8_0_falls_back_to_f16_where_rows_do_not_split_into_blocks(tmp_path, tokenizer):
    folder, model, _ = pruned_folder(tmp_path / "p", tokenizer=tokenizer)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert any(w % 32 for w in widths)
    out = export(folder, "gguf", tmp_path / "p.gguf", dtype="q8_0")
    assert out.details["f16_fallback"] == [f"blk.{i}.ffn_down.weight" for i, w in enumerate(widths) if w % 32]
    assert "f16, not q8_0" in out.details["notes"][0]


def test_cli_export_and_its_refusals(tmp_path, tokenizer, capsys):
    folder, _, _ = pruned_folder(tmp_path / "p", tokenizer=tokenizer)
    target = tmp_path / "p.gguf"
    code, out, _ = run_cli(capsys, "export", folder, "--format", "gguf", "--output", target)
    assert code == 0 and "wrote" in out and target.is_file()
    cases = [
        (["--format", "onnx"], "`format` 'onnx' is not one llmp exports"),
        (["--format", "gguf", "--dtype", "q4_k"], "`dtype` 'q4_k' is not a GGUF type"),
        (["--format", "gguf"], "exists; choose another path or pass --overwrite"),
        (["--format", "decilm", "--dtype", "q8_0"], "a DeciLM folder holds"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(capsys, "export", folder, "--output", target, *extra)
        assert code == 2 and message in err, err
    code, _, err = run_cli(capsys, "export", folder, "--format", "gguf", "--output", tmp_path / "p.bin")
    assert code == 2 and "ends in .gguf" in err
    code, _, err = run_cli(capsys, "export", tmp_path / "nothing", "--format", "gguf", "--output", tmp_path / "x.gguf")
    assert code == 2 and "no model folder at" in err
    before = target.stat().st_mtime_ns
    code, _, _ = run_cli(capsys, "export", folder, "--format", "gguf", "--output", target, "--overwrite")
    assert code == 0 and target.stat().st_mtime_ns != before


def test_overwrite_never_replaces_a_file_llmp_did_not_write(tmp_path, tokenizer, capsys):
    folder, _, _ = pruned_folder(tmp_path / "p", tokenizer=tokenizer)
    theirs = tmp_path / "theirs.gguf"
    theirs.write_bytes(b"GGUF their own model")
    code, _, err = run_cli(capsys, "export", folder, "--format", "gguf", "--output", theirs, "--overwrite")
    assert code == 2 and "was not written by `llmp export`" in err
    assert theirs.read_bytes() == b"GGUF their own model"


def test_other_families_are_refused_with_the_reason(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "g")
    with pytest.raises(LlmpError, match="is a 'gpt2' model; exports take the Llama layout"):
        export(tmp_path / "g", "gguf", tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists()


def test_an_interrupted_export_leaves_no_file(tmp_path, tokenizer, monkeypatch):
    folder, _, _ = pruned_folder(tmp_path / "p", tokenizer=tokenizer)
    import llmp.export.gguf as module

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "add_vocabulary", fail)
    with pytest.raises(KeyboardInterrupt):
        export(folder, "gguf", tmp_path / "p.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


# ---- DeciLM (vLLM) --------------------------------------------------------------------------------


def vllm_shapes(config) -> dict[str, tuple[int, ...]]:
    """The parameter shapes vLLM's DeciLMForCausalLM builds from ``config`` (read from vLLM's
    nemotron_nas.py: global heads and head_dim, per block KV heads = heads / n_heads_in_group and
    the ffn's intermediate_size when it has no ffn_mult; biases per kind by attention_bias / mlp_bias)."""
    h, heads, d = config.hidden_size, config.num_attention_heads, config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i, block in enumerate(config.block_configs):
        p = f"model.layers.{i}."
        assert not hasattr(block.ffn, "ffn_mult")  # vLLM then reads intermediate_size
        kv, width = heads // block.attention.n_heads_in_group, block.ffn.intermediate_size
        assert heads % block.attention.n_heads_in_group == 0
        rows = {"q_proj": heads * d, "k_proj": kv * d, "v_proj": kv * d}
        for name, out in rows.items():
            shapes[f"{p}self_attn.{name}.weight"] = (out, h)
        shapes[f"{p}self_attn.o_proj.weight"] = (h, heads * d)
        shapes[f"{p}mlp.gate_proj.weight"] = shapes[f"{p}mlp.up_proj.weight"] = (width, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, width)
        shapes[f"{p}input_layernorm.weight"] = shapes[f"{p}post_attention_layernorm.weight"] = (h,)
        if config.attention_bias:
            shapes |= {f"{p}self_attn.{n}.bias": (o,) for n, o in {**rows, "o_proj": h}.items()}
        if config.mlp_bias:
            shapes |= {
                f"{p}mlp.{n}.bias": (o,) for n, o in {"gate_proj": width, "up_proj": width, "down_proj": h}.items()
            }
    return shapes


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2", "llama-bias"])
def test_decilm_folder_has_what_vllm_reads(tmp_path, tokenizer, name):
    from safetensors import safe_open
    from transformers import AutoConfig

    folder, model, _ = pruned_folder(tmp_path / "p", name, attention="none", compensate="bias", tokenizer=tokenizer)
    out = export(folder, "decilm", tmp_path / "d")
    config = AutoConfig.from_pretrained(out.path, trust_remote_code=True)  # the folder's own config code
    assert config.model_type == "nemotron-nas" and config.architectures == ["DeciLMForCausalLM"]
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert [b.ffn.intermediate_size for b in config.block_configs] == widths and len(set(widths)) > 1
    with safe_open(out.path / "model.safetensors", "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert stored == vllm_shapes(config)
    assert config.mlp_bias  # the compensation's down_proj bias, with zero gate/up biases beside it
    assert (out.path / "pruning_report.json").is_file() and (out.path / "tokenizer.json").is_file()


def test_decilm_weights_compute_the_pruned_model(tmp_path, tokenizer):
    """Rebuild the model from the DeciLM folder as vLLM lays it out (Llama layers, biases switched
    per kind by attention_bias / mlp_bias, per-block widths): the same logits as the pruned Qwen2."""
    folder, model, _ = pruned_folder(tmp_path / "p", "qwen2", attention="none", compensate="bias", tokenizer=tokenizer)
    out = export(folder, "decilm", tmp_path / "d")
    config = json.loads((out.path / "config.json").read_text())
    shapes = [{"heads": config["num_attention_heads"],
               "kv_heads": config["num_attention_heads"] // b["attention"]["n_heads_in_group"],
               "mlp": b["ffn"]["intermediate_size"]} for b in config["block_configs"]]  # fmt: skip
    rebuilt = {k: v for k, v in config.items() if k not in ("auto_map", "block_configs")}
    rebuilt |= {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "llmp_layer_shapes": shapes}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps(rebuilt))
    (tmp_path / "r" / "model.safetensors").write_bytes((out.path / "model.safetensors").read_bytes())
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits(load_pruned(tmp_path / "r"), ids), logits(model, ids))


def test_decilm_refuses_layers_with_different_query_heads(tmp_path, tokenizer):
    folder, _, _ = pruned_folder(tmp_path / "p", tokenizer=tokenizer)
    with pytest.raises(LlmpError, match="different numbers of query heads .* `--target vllm`"):
        export(folder, "decilm", tmp_path / "d")
    assert not (tmp_path / "d").exists()


# ---- --target: pruning inside an engine's envelope ------------------------------------------------


def test_target_settings_and_their_refusals():
    """The user's config stays as written; resolved for a model it takes the target's envelope."""
    model = tiny_model("llama-mha")
    assert llmp.PruneConfig(target="hf").layout == "heterogeneous"
    assert llmp.PruneConfig(target="hf").resolved(model).layout == "uniform"
    assert llmp.PruneConfig(target="gguf").resolved(model).round_to == 32
    assert llmp.PruneConfig(target="vllm", round_to=48).resolved(model).round_to == 192  # a multiple of both
    with pytest.raises(LlmpError, match=r"`target` hf \(plain transformers: layout uniform\) prunes every layer alike"):
        llmp.PruneConfig(target="hf", ranking="global")
    with pytest.raises(LlmpError, match="`target` vllm keeps the query heads of every layer"):
        llmp.PruneConfig(target="vllm", attention="query")
    with pytest.raises(LlmpError, match="`target` must be one of any, gguf, vllm, hf; got 'onnx'"):
        llmp.PruneConfig(target="onnx")


def test_target_refuses_a_family_llmp_does_not_export():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(LlmpError, match="`target` gguf: llmp exports the Llama layout"):
        llmp.prune(model, llmp.PruneConfig(target="gguf", criterion="l2"))


def test_target_vllm_gives_a_model_decilm_serves(tmp_path, tokenizer):
    big_mlp = {"intermediate_size": 512}
    folder, model, _ = pruned_folder(
        tmp_path / "p", attention="none", target="vllm", tokenizer=tokenizer, ratio=0.2, model_kwargs=big_mlp
    )
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert all(w % 64 == 0 for w in widths) and max(widths) < 512
    record = json.loads((folder / "pruning_report.json").read_text())
    assert "vLLM (llmp export --format decilm)" in record["engines"]
    assert (
        "Loads in: llmp.load_pruned" in (folder / "report.md").read_text() if (folder / "report.md").exists() else True
    )
    export(folder, "decilm", tmp_path / "d")


def test_heterogeneous_heads_are_not_listed_for_vllm(tmp_path, tokenizer):
    folder, _, _ = pruned_folder(tmp_path / "p", tokenizer=tokenizer)
    engines = json.loads((folder / "pruning_report.json").read_text())["engines"]
    assert engines == ["llmp.load_pruned", "llama.cpp (llmp export --format gguf)"]


def test_prune_export_in_one_step(tmp_path, tiny_dir, capsys):
    out = tmp_path / "p"
    argv = ["prune", "--model", tiny_dir, "--ratio", "0.1", "--output", out, "--export", "gguf", "--target", "gguf"]
    code, stdout, err = run_cli(capsys, *argv, "--num-samples", "2", "--seq-len", "16", "--samples", "0")
    assert code == 0, err
    assert f"exported to {tmp_path / 'p.gguf'}" in stdout
    meta = dict(read_metadata(tmp_path / "p.gguf"))
    assert json.loads(meta[REPORT_KEY])["settings"]["target"] == "gguf"
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "not empty; choose another path or pass --overwrite" in err


def test_fit_exports_the_recovered_model(tiny_dir, tmp_path):
    from llmp.fit import main as fit_main

    out = tmp_path / "fit"
    assert fit_main([*recipe(tiny_dir, tmp_path), f"--output={out}", "--export=gguf"]) == 0
    meta = dict(read_metadata(tmp_path / "fit.gguf"))
    assert json.loads(meta[REPORT_KEY])["recovery"]["mode"] == "lora"
    assert fit_main([*recipe(tiny_dir, tmp_path), "--export=gguf"]) == 2  # nothing saved to export
