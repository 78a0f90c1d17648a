"""Output folders: `--overwrite` never deletes what llmp did not write, and writes are whole or nothing."""

import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import pytest
from helpers import blank_record, run_cli, tiny_model

from llmp import outcheck, outdir
from llmp.errors import LlmpError
from llmp.io import load_pruned, save_pruned

ROOT = Path(__file__).resolve().parent.parent


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) → its SHA-256: compared byte for byte."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def user_folder(tmp_path) -> Path:
    folder = tmp_path / "mine"
    (folder / "notes").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "notes" / ".hidden").write_bytes(os.urandom(64))
    return folder


def test_overwrite_refuses_a_folder_llmp_did_not_write(user_folder, tmp_path):
    before = snapshot(user_folder)
    with pytest.raises(LlmpError, match="was not written by llmp .* --overwrite will not replace it"):
        save_pruned(tiny_model("llama-mha"), user_folder, overwrite=True)
    assert snapshot(user_folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_overwrite_refuses_user_files_added_to_an_llmp_folder(tmp_path):
    out = save_pruned(tiny_model("llama-mha"), tmp_path / "out")
    (out / "my-eval.csv").write_text("keep me")
    (out / "report.md").write_text("llmp writes this one later")  # llmp's own: does not block
    before = snapshot(out)
    with pytest.raises(LlmpError, match=r"holds files llmp did not write \(my-eval.csv\)"):
        save_pruned(tiny_model("llama-mha"), out, overwrite=True)
    assert snapshot(out) == before


def test_overwrite_replaces_an_llmp_folder_and_old_folders_without_marker(tmp_path):
    out = save_pruned(tiny_model("llama-mha"), tmp_path / "out")
    assert (out / outcheck.MARKER).is_file()
    (out / "report.md").write_text("old")
    save_pruned(tiny_model("llama-gqa"), out, record=blank_record(), overwrite=True)
    assert not (out / "report.md").exists() and (out / "pruning_report.json").is_file()
    (out / outcheck.MARKER).unlink()  # a folder from an older llmp: its report marks it
    save_pruned(tiny_model("llama-mha"), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    load_pruned(out)


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_output_overlapping_the_input_model_is_refused(tiny_dir, tmp_path, capsys, where):
    base = tmp_path / "parent" / "base"
    base.mkdir(parents=True)
    for file in tiny_dir.iterdir():
        (base / file.name).write_bytes(file.read_bytes())
    (base / "pruning_report.json").write_text("{}")  # even an llmp folder
    output = {"same": base, "parent": base.parent, "inside": base / "sub"}[where]
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "prune", "--model", base, "--output", output, "--overwrite")
    assert code == 2 and "overlaps the input" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_output_through_a_symlink_resolves_it(tmp_path):
    real = save_pruned(tiny_model("llama-mha"), tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    save_pruned(tiny_model("llama-gqa"), link, overwrite=True)
    assert link.is_symlink() and link.resolve() == real  # the link stays a link to the new folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no `.link.old-*` left
    load_pruned(link)


def test_output_dot_is_a_clear_error(tmp_path, capsys, monkeypatch):
    save_pruned(tiny_model("llama-mha"), tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "prune", "--model", "x/y", "--output", ".", "--overwrite")
    assert code == 2 and "is the current folder" in err
    monkeypatch.chdir(tmp_path / "here")
    code, _, err = run_cli(capsys, "prune", "--model", "x/y", "--output", "..", "--overwrite")
    assert code == 2 and "is the current folder or holds it" in err
    assert snapshot(tmp_path) == before


def test_swap_without_exchange_keeps_the_old_folder_until_the_new_one_is_in_place(tmp_path):
    out = save_pruned(tiny_model("llama-mha"), tmp_path / "out")
    old = snapshot(out)
    real_rename = os.rename

    def failing(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    with mock.patch.object(outdir, "_exchange", return_value=False), mock.patch.object(os, "rename", failing):
        with pytest.raises(OSError, match="No space"):
            save_pruned(tiny_model("llama-gqa"), out, overwrite=True)
    assert snapshot(out) == old  # the old output was put back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with mock.patch.object(outdir, "_exchange", return_value=False):  # the plain two-rename path works
        save_pruned(tiny_model("llama-gqa"), out, overwrite=True)
    assert snapshot(out) != old and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_swap_cut_between_its_renames_is_restored_by_the_next_write(tmp_path):
    out = save_pruned(tiny_model("llama-mha"), tmp_path / "out")
    old = snapshot(out)
    os.rename(out, tmp_path / ".out.old-otherhost-123-abcd")  # what a crash mid-swap leaves
    with pytest.raises(LlmpError, match="not empty"):  # restored first, so still protected
        save_pruned(tiny_model("llama-gqa"), out)
    assert snapshot(out) == old


def test_stale_temporaries_are_removed_by_the_next_write(tmp_path):
    stale = tmp_path / ".out.tmp-somehost-99999-x1y2"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    legacy = tmp_path / ".out.tmp-ab12cd34"  # the naming of earlier llmp versions
    legacy.mkdir()
    other = tmp_path / ".other.tmp-somehost-1-zz"  # another output's, from another machine: not ours to touch
    other.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".other.tmp-{socket.gethostname()}-{int(dead.stdout)}-qq"  # its writer died here
    orphan.mkdir()
    alive = tmp_path / f".other.tmp-{socket.gethostname()}-{os.getpid()}-rr"  # its writer still runs
    alive.mkdir()
    save_pruned(tiny_model("llama-mha"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, alive.name, "out"])


def test_a_second_writer_is_refused_while_the_first_holds_the_output(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from llmp.outlock import output_lock; import time\nwith output_lock({str(out)!r}):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LlmpError, match="another llmp process is writing"):
            save_pruned(tiny_model("llama-mha"), out)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    save_pruned(tiny_model("llama-mha"), out)  # the lock died with its holder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = save_pruned(tiny_model("llama-mha"), tmp_path / "out", record=blank_record())
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}


def test_output_under_a_file_or_unwritable_parent_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "prune", "--model", "no/such-model", "--output", tmp_path / "afile" / "out")
    assert code == 2 and "is a file, not a folder" in err
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:  # root writes anywhere: then the permission check itself is what answers no
        with (
            mock.patch.object(outdir.os, "access", return_value=False) if os.access(locked, os.W_OK) else nullcontext()
        ):
            code, _, err = run_cli(capsys, "prune", "--model", "no/such-model", "--output", locked / "out")
        assert code == 2 and "is not writable" in err
    finally:
        locked.chmod(0o700)


def _prune_command(tiny_dir: Path, out: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "llmp.cli", "prune", "--model", str(tiny_dir), "--output", str(out)),
        *("--criterion", "l1", "--samples", "0", "--attention", "kv"),
    ]


def test_sigterm_during_prune_writes_nothing_and_says_so(tiny_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    slow = "import time, llmp.pruning as p; real = p.prune\n"  # hold the run inside prune()
    slow += (
        "def prune(*a, **k):\n    print('pruning', flush=True); time.sleep(30); return real(*a, **k)\np.prune = prune\n"
    )
    slow += "import sys; from llmp.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", slow, *_prune_command(tiny_dir, out)[3:]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "pruning"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted: nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupt_after_the_model_is_saved_says_what_was_written(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with mock.patch("llmp.report.write_report", side_effect=KeyboardInterrupt):
        code, _, err = run_cli(capsys, *_prune_command(tiny_dir, out)[3:])
    assert code == 130 and f"interrupted: written completely: {out}" in err
    load_pruned(out)


def test_kill_9_mid_write_leaves_a_temporary_that_the_next_run_removes(tiny_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stall = "import time, llmp.outdir as o; real = o._fsync_tree\n"  # stop after the files are in the temp folder
    stall += "def f(t):\n    print('written', flush=True); time.sleep(60)\no._fsync_tree = f\n"
    stall += "import sys; from llmp.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", stall, *_prune_command(tiny_dir, out)[3:]], stdout=subprocess.PIPE, text=True, env=env
    )
    assert any(line.strip() == "written" for line in iter(proc.stdout.readline, ""))  # reads up to that line
    proc.kill()
    proc.wait()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert not out.exists() and any(name.startswith(".out.tmp-") for name in leftovers)
    done = subprocess.run(_prune_command(tiny_dir, out), capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_concurrent_prunes_to_one_output(tiny_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(_prune_command(tiny_dir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
        for _ in range(2)
    ]  # fmt: skip
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0, results
    if codes[1] != 0:  # the second one started while the first held the output, or after it
        assert codes[1] == 2 and any(
            "another llmp process is writing" in err or "is not empty" in err for _, err in results
        ), results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    load_pruned(out)  # whole: it loads
