"""The new surfaces tried the way they break (issue 30): each case a row, each rule with its siblings.

Data loss and code: an unmarked folder with a user's file, glob characters in a name, code named by a
tokenizer's config. Runs lost: a mount point, a missing shard, a teacher with another tokenizer, a
cache that cannot be written. Export inputs that used to give a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import blank_record, pruned_folder, run_cli, tiny_model, tiny_tokenizer

from llmp import LlmpError, PruneConfig, outcheck, outdir
from llmp.distill import DistillSettings, Teacher
from llmp.export import export
from llmp.io import load_pruned, save_pruned
from llmp.pruning import prune_streamed
from llmp.remote_code import strip_code


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


# -- 1. an unmarked folder is replaced only when it holds nothing but what llmp writes --------------


def test_overwrite_spares_an_unmarked_folder_holding_a_users_file(tiny_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    shutil.copy(
        save_pruned(tiny_model("llama-mha"), tmp_path / "x", record=blank_record()) / "pruning_report.json", mine
    )
    (tmp_path / "link").symlink_to(mine)
    code, _, err = run_cli(
        capsys, "prune", "--model", tiny_dir, "--ratio", "0.2", "--output", tmp_path / "link", "--stream",
        "--overwrite", "--num-samples", "2", "--seq-len", "16", "--calibration", "c4", "--samples", "0",
    )  # fmt: skip
    assert code == 2 and "holds files llmp did not write (thesis.tex)" in err
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_an_unmarked_folder_of_only_llmp_files_is_still_replaced(tmp_path):
    out = save_pruned(tiny_model("llama-mha"), tmp_path / "out", record=blank_record())
    (out / outcheck.MARKER).unlink()
    (out / "report.md").write_text("old")
    assert outcheck.foreign_files(out) == []
    (out / "notes").mkdir()
    (out / "notes" / "report.md").write_text("mine")  # llmp writes nothing in a subfolder
    assert outcheck.foreign_files(out) == ["notes/report.md"]


# -- 2. names are matched literally, and a live writer's temporary is never removed ------------------


def test_glob_characters_in_a_name_spare_another_outputs_live_temporary(tmp_path):
    live = tmp_path / f".p1.gguf.tmp-{socket.gethostname()}-{os.getppid()}-ab"  # a running writer of p1.gguf
    live.write_bytes(b"half an export")
    folder = tmp_path / f".p1.tmp-{socket.gethostname()}-{os.getppid()}-cd"
    folder.mkdir()
    outdir.clean_stale(tmp_path / "p[1].gguf")
    outdir.clean_stale(tmp_path / "p[1]")
    assert live.exists() and folder.exists()


def test_a_temporary_of_the_same_output_is_removed_only_when_its_writer_is_gone(tmp_path):
    host = socket.gethostname()
    alive = tmp_path / f".out.tmp-{host}-{os.getppid()}-ab"
    gone = tmp_path / f".out.tmp-{host}-{_dead_pid()}-cd"
    alive.mkdir(), gone.mkdir()
    outdir.clean_stale(tmp_path / "out")
    assert alive.exists() and not gone.exists()


# -- 3. nothing llmp writes names code that llmp did not write ------------------------------------


def _with_tokenizer_code(folder: Path) -> None:
    """A standard tokenizer whose config also names a module of its own (transformers loads it
    without running the code, and saves the `auto_map` again)."""
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    path.write_text(json.dumps(data))
    (folder / "tokenization_evil.py").write_text("raise SystemExit('ran')\n")


@pytest.mark.parametrize("format", ["decilm", "gguf"])
def test_an_export_carries_no_tokenizer_code(tmp_path, format):
    folder, _, _ = pruned_folder(tmp_path / "p", attention="none", compensate="none")
    _with_tokenizer_code(folder)
    out = export(folder, format, tmp_path / ("e.gguf" if format == "gguf" else "e"))
    if format == "decilm":
        assert "auto_map" not in json.loads((out.path / "tokenizer_config.json").read_text())
        assert json.loads((out.path / "config.json").read_text())["auto_map"] == {
            "AutoConfig": "configuration_decilm.DeciLMConfig"
        }
        assert sorted(p.name for p in out.path.glob("*.py")) == ["configuration_decilm.py"]


def test_a_pruned_folder_carries_no_tokenizer_code(tiny_dir, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(tiny_dir, source)
    _with_tokenizer_code(source)
    for args in (["--stream"], []):
        out = tmp_path / f"out{len(args)}"
        code, _, err = run_cli(
            capsys, "prune", "--model", source, "--ratio", "0.2", "--output", out, *args,
            "--num-samples", "2", "--seq-len", "16", "--calibration", "c4", "--samples", "0",
        )  # fmt: skip
        assert code == 0, err
        assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
        assert not list(out.glob("*.py"))


def test_strip_code_keeps_llmps_own_module_only(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"auto_map": {"AutoConfig": "configuration_decilm.X", "AutoModel": "hub/repo--modeling.Y"}})
    )
    (tmp_path / "modeling.py").write_text("")
    (tmp_path / "configuration_decilm.py").write_text("")
    assert strip_code(tmp_path, own=["configuration_decilm"]) == ["modeling.py", "config.json `auto_map`"]
    assert json.loads((tmp_path / "config.json").read_text()) == {"auto_map": {"AutoConfig": "configuration_decilm.X"}}


def test_a_tokenizer_that_needs_its_own_code_is_refused_by_the_export(tmp_path):
    folder, _, _ = pruned_folder(tmp_path / "p", attention="none")
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "EvilTokenizer"}))
    with pytest.raises(LlmpError, match="names a tokenizer with its own Python code .'EvilTokenizer'"):
        export(folder, "decilm", tmp_path / "e")
    assert not (tmp_path / "e").exists()


# -- 4. a mount point as the output -----------------------------------------------------------------


def test_a_mount_point_output_is_refused_before_the_work(tiny_dir, capsys):
    mount = next((Path(p) for p in ("/dev/shm", "/dev", "/proc") if os.path.ismount(p)), None)
    if mount is None:
        pytest.skip("no mount point to try on this machine")
    code, _, err = run_cli(capsys, "prune", "--model", tiny_dir, "--ratio", "0.2", "--output", mount, "--overwrite")
    assert code == 2 and "is a mount point" in err and f"e.g. {mount / 'pruned'}" in err


# -- 5. a missing shard or tensor is named before any layer is read ---------------------------------


def _sharded(folder: Path) -> Path:
    tiny_model("llama-gqa").save_pretrained(folder, max_shard_size="20KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.mark.parametrize("broken", ["shard", "index and shard", "dangling link"])
def test_stream_names_a_missing_shard_before_any_work(tmp_path, broken):
    folder = _sharded(tmp_path / "src")
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.unlink()
    if broken == "index and shard":
        (folder / "model.safetensors.index.json").unlink()
        match = r"lacks \d+ tensors its config needs"
    elif broken == "dangling link":
        shard.symlink_to(tmp_path / "gone.safetensors")
        match = "is a symlink to nothing"
    else:
        match = rf"lacks 1 of the \d+ shards its model.safetensors.index.json names \({shard.name}\)"
    calib = torch.randint(0, 100, (2, 8))
    with pytest.raises(LlmpError, match=match):
        prune_streamed(folder, tmp_path / "out", PruneConfig(ratio=0.2, criterion="flap"), calib)
    assert not (tmp_path / "out").exists()


# -- 6, 7. the teacher: its tokenizer, its cache, its top-k ------------------------------------------


def test_a_teacher_with_another_tokenizer_of_the_same_size_is_refused():
    vocab = tiny_tokenizer().get_vocab()
    swapped = dict(vocab)
    a, b = sorted(vocab, key=vocab.get)[100:102]
    swapped[a], swapped[b] = vocab[b], vocab[a]
    teacher = Teacher(tiny_model("llama-gqa"), source="other")
    with pytest.raises(LlmpError, match=r"another tokenizer than the model \(2 tokens differ"):
        teacher.check_tokenizer(SimpleNamespace(get_vocab=lambda: swapped), SimpleNamespace(get_vocab=lambda: vocab))
    teacher.check_tokenizer(SimpleNamespace(get_vocab=lambda: vocab), SimpleNamespace(get_vocab=lambda: dict(vocab)))


def test_teacher_cache_paths_are_checked_before_anything_loads(tmp_path):
    (tmp_path / "afile").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    rows = {
        tmp_path: "is a folder; name a file in it",
        tmp_path / "afile" / "c.safetensors": "is a file, not a folder",
        ro / "c.safetensors": "is not writable",
    }
    try:
        for cache, message in rows.items():
            problems = DistillSettings(top_k=8, cache=str(cache)).problems()
            if message == "is not writable" and os.access(ro, os.W_OK):
                continue  # root writes anywhere
            assert any(message in p and "distill.cache" in p for p in problems), (cache, problems)
        assert DistillSettings(top_k=8, cache=str(tmp_path / "new" / "c.safetensors")).problems() == []
    finally:
        ro.chmod(0o700)


def test_top_k_above_the_vocabulary_is_a_clear_error(tiny_dir):
    from llmp.recovery import RecoveryModule

    module = RecoveryModule(str(tiny_dir), distill=DistillSettings(top_k=10**6, cache=None))
    with pytest.raises(LlmpError, match=r"`distill.top_k` 1000000 exceeds the model's vocabulary"):
        module.load_base()


# -- export inputs that gave a traceback ------------------------------------------------------------


@pytest.fixture
def exportable(tmp_path) -> Path:
    folder, _, _ = pruned_folder(tmp_path / "p", attention="none")
    return folder


def _break_tokenizer_json(folder):
    (folder / "tokenizer.json").write_text("{not json")


def _drop_vocab_size(folder):
    path = folder / "config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "vocab_size"}))


def _drop_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("format", "change", "output", "message"),
    [
        ("gguf", _break_tokenizer_json, "e.gguf", r"tokenizer.json is not JSON"),
        ("decilm", _break_tokenizer_json, "e", r"tokenizer.json is not JSON"),
        ("gguf", _drop_vocab_size, "e.gguf", r"config.json has no `vocab_size`"),
        ("decilm", _drop_tokenizer, "e", r"has no tokenizer .* vLLM serves the DeciLM folder's own"),
        ("gguf", None, "afile/e.gguf", r"afile is a file, not a folder"),
        ("gguf", None, "p/e.gguf", r"overlaps the input"),
        ("gguf", None, "loop.gguf", r"is a symlink to nothing \(or a loop\)"),
        ("decilm", None, "loop.gguf", r"is a symlink to nothing \(or a loop\)"),
    ],
)
def test_export_refuses_bad_inputs_before_the_work(exportable, tmp_path, format, change, output, message):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "loop.gguf").symlink_to(tmp_path / "loop.gguf")
    if change is not None:
        change(exportable)
    with pytest.raises(LlmpError, match=message):
        export(exportable, format, tmp_path / output)
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.gguf").exists()


def test_export_of_a_folder_with_a_dangling_weights_link(exportable, tmp_path):
    shard = next(exportable.glob("*.safetensors"))
    shard.rename(tmp_path / "moved.safetensors")
    shard.symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(LlmpError, match="is a symlink to nothing"):
        export(exportable, "gguf", tmp_path / "e.gguf")
    load = pytest.raises(LlmpError, match="symlink to nothing|cannot|missing|No such file")
    with load:
        load_pruned(exportable)


# -- a full disk: refused before the work where the size is known, one clear line where it is not ------


def test_a_prune_to_a_full_disk_is_refused_before_the_work(tiny_dir, small_fs, capsys):
    small = small_fs(256)
    code, _, err = run_cli(
        capsys, "prune", "--model", tiny_dir, "--ratio", "0.2", "--output", small / "out", "--samples", "0"
    )
    assert code == 2 and "free and this run writes about" in err and "free space or choose another path" in err
    assert list(small.iterdir()) == []


def test_an_export_that_runs_out_of_space_says_so_and_leaves_nothing(tmp_path, small_fs, capsys):
    _, model, _ = pruned_folder(tmp_path / "p", attention="none")
    half = tmp_path / "half"
    save_pruned(model.to(torch.bfloat16), half, tiny_tokenizer(), blank_record())
    size = sum(f.stat().st_size for f in half.glob("*.safetensors"))
    small = small_fs(int(size * 1.5) // 1024)  # passes the estimate (the bf16 bytes), not the f32 file
    code, _, err = run_cli(capsys, "export", half, "--format", "gguf", "--output", small / "e.gguf", "--dtype", "f32")
    assert code == 2 and "error: no space left on the device" in err and "nothing partial was kept" in err, err
    assert list(small.iterdir()) == []


def test_a_streamed_prune_that_runs_out_of_space_says_so_and_leaves_nothing(tmp_path, small_fs, capsys):
    half = tmp_path / "half"
    model = tiny_model("llama-gqa", vocab_size=len(tiny_tokenizer()))
    save_pruned(model.to(torch.bfloat16), half, tiny_tokenizer(), blank_record())
    size = sum(f.stat().st_size for f in half.glob("*.safetensors"))
    small = small_fs(int(size * 1.2) // 1024)  # passes the estimate (80% of the bf16 bytes), not float32 weights
    code, _, err = run_cli(
        capsys, "prune", "--model", half, "--ratio", "0.2", "--output", small / "out", "--stream", "--dtype", "float32",
        "--num-samples", "2", "--seq-len", "16", "--samples", "0",
    )  # fmt: skip
    assert code == 2 and "error: no space left on the device" in err and "nothing partial was kept" in err, err
    assert list(small.iterdir()) == []


# -- messages name what the user passed, and a plan that would fail its export is refused first ------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stream", "--scope", "channel"], "`--stream` prunes heads and MLP channels from each layer's activations: it takes `--scope` block; got `--scope` channel"),
        (["--stream", "--steps", "2"], "`--stream` prunes in one pass: `--steps` must be 1; got 2"),
        (["--stream", "--criterion", "taylor"], "`--stream` scores each layer from its activations, without gradients"),
        (["--target", "hf", "--layers", "1:3"], "`--target` hf (plain transformers: layout uniform) prunes every layer alike"),
        (["--export", "gguf", "--export-dtype", "q4"], "`--export-dtype` 'q4' is not a GGUF type llmp writes"),
        (["--export", "decilm", "--export-dtype", "q8_0"], "`--export-dtype` 'q8_0': a DeciLM folder holds"),
        (["--export", "decilm", "--attention", "query"], "`--export` decilm needs the same query heads in every layer"),
    ],
)  # fmt: skip
def test_prune_messages_name_the_flags_given(tiny_dir, tmp_path, capsys, args, message):
    code, _, err = run_cli(capsys, "prune", "--model", tiny_dir, "--ratio", "0.2", "--output", tmp_path / "o", *args)
    assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()  # refused before pruning


def test_a_decilm_folder_is_refused_by_what_llmp_reads(tiny_dir, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "prune", "--model", tiny_dir, "--ratio", "0.1", "--output", tmp_path / "o", "--target", "vllm",
        "--export", "decilm", "--num-samples", "2", "--seq-len", "16", "--samples", "0",
    )  # fmt: skip
    assert code == 0, err
    decilm = tmp_path / "o.decilm"
    for command in (
        ["eval", "ppl", "--model", decilm, "--data", "wikitext2"],
        ["prune", "--model", decilm, "--ratio", "0.2", "--output", tmp_path / "again", "--stream"],
        ["generate", "--model", decilm, "--prompt", "Hi"],
    ):
        code, _, err = run_cli(capsys, *command)
        assert code == 2 and "is a DeciLM export, for vLLM" in err and "the folder it was exported from" in err, err


def test_the_record_keeps_the_model_path_absolute_and_a_lost_relative_one_is_named(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    from llmp.distill import original_of
    from llmp.record import read_record, write_record

    monkeypatch.chdir(tiny_dir.parent)
    out = tmp_path / "o"
    args = ["--num-samples", "2", "--seq-len", "16", "--samples", "0"]
    code, _, err = run_cli(capsys, "prune", "--model", tiny_dir.name, "--ratio", "0.2", "--output", out, *args)
    assert code == 0, err
    record = read_record(out)
    assert record.model == str(tiny_dir.resolve())
    monkeypatch.chdir(tmp_path)
    assert original_of(str(out)) == str(tiny_dir.resolve())  # found from any folder
    record.model = "./models/base"  # what an older llmp recorded
    write_record(out, record)
    with pytest.raises(LlmpError, match=r"pruned from './models/base', a path relative to where `llmp prune` ran"):
        original_of(str(out))


def test_a_tiny_calibration_warns_with_the_number(caplog):
    model = tiny_model("llama-gqa")
    with caplog.at_level("WARNING"):
        from llmp import prune

        prune(model, PruneConfig(ratio=0.2, criterion="flap"), torch.randint(0, 100, (1, 2)))
    assert "calibration holds 2 tokens" in caplog.text and "give at least 512" in caplog.text


def test_fit_refuses_a_decilm_export_of_per_layer_heads_before_training(tiny_dir, tmp_path, capsys):
    """The recipe's pruning removes whole KV groups per layer: its DeciLM export would fail after the
    training, so the fit is refused before the data is read."""
    from helpers import recipe

    from llmp.fit import main as fit_main

    out = tmp_path / "out"
    code = fit_main(recipe(tiny_dir, tmp_path, output=out, export="decilm"))
    err = capsys.readouterr().err
    assert code == 2 and "`export` decilm needs the same query heads in every layer" in err, err
    assert not out.exists() and not list(tmp_path.glob("**/*.ckpt"))


def test_the_remote_code_message_names_the_file_that_asks_for_code(tmp_path):
    from llmp.remote_code import remote_code_error

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["t.T", None]}}))
    err = remote_code_error(tmp_path, ValueError("set trust_remote_code=True"))
    assert "(tokenizer_config.json `auto_map`)" in str(err)
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "m.M"}}))
    assert "(config.json `auto_map`)" in str(remote_code_error(tmp_path, ValueError("trust_remote_code")))


@pytest.mark.parametrize("format", ["gguf", "decilm"])
def test_an_export_into_a_read_only_file_system_is_refused_first(exportable, small_fs, format):
    ro = small_fs(64, "ro")  # read-only for root too
    with pytest.raises(LlmpError, match="is not writable"):
        export(exportable, format, ro / ("e.gguf" if format == "gguf" else "e"))


def test_a_fit_whose_output_fills_up_keeps_the_trained_model(tiny_dir, tmp_path, small_fs, capsys):
    """The disk fills while the fit trains: the save fails with one line, and the trained weights
    are kept in the fit's root folder, from which they export once there is room."""
    from helpers import recipe

    from llmp.fit import main as fit_main
    from llmp.recovery import export_checkpoint

    small = small_fs(4096)
    fill = {"class_path": "helpers.FillDisk", "init_args": {"folder": str(small)}}
    code = fit_main([*recipe(tiny_dir, tmp_path, output=small / "out"), "--trainer.callbacks+", json.dumps(fill)])
    err = capsys.readouterr().err
    assert code == 2 and "no space left on the device" in err and "the trained model was kept in" in err, err
    assert sorted(p.name for p in small.iterdir()) == ["filler"]  # nothing partial
    (kept,) = tmp_path.glob("llmp-trained-*.ckpt")
    out = export_checkpoint(kept, tmp_path / "saved")
    assert load_pruned(out).num_parameters() < tiny_model("llama-gqa").num_parameters()
