"""Bad inputs and faults tried against `llmp` as a new user would: each ends in exit 2, one
`error:` line, no traceback, and the files of the work folder unchanged.

``python tests/test_bad_input_table.py DIR`` prints the table (the closing note of issue 10 has it).
"""

import contextlib
import hashlib
import io
import json
import os
import sys
import traceback
from pathlib import Path

from helpers import blank_record, make_tiny_folder, tiny_model

from llmp.cli import main
from llmp.io import save_pruned


def cases(W: Path) -> list[tuple[str, list[str]]]:
    """Build the inputs under ``W`` (the current folder while they run); the cases that use them."""
    tiny = make_tiny_folder(W / "tiny")
    GARB = bytes(range(256)) * 8
    (W / "garbage.jsonl").write_bytes(GARB)
    (W / "garbage.txt").write_bytes(GARB)
    (W / "mixed.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    (W / "scalar.json").write_text("42")
    (W / "empty.txt").write_text("\n")
    (W / "nofield.jsonl").write_text('{"body": "x"}\n')
    (W / "afile").write_text("x")
    (W / "user").mkdir()
    (W / "user" / "thesis.tex").write_text("years")
    (W / "parent" / "base").mkdir(parents=True)
    for f in tiny.iterdir():
        (W / "parent" / "base" / f.name).write_bytes(f.read_bytes())
    (W / "results").mkdir()
    (W / "tasks").mkdir()
    (W / "tasks" / "piqa.jsonl").write_bytes(GARB)
    (W / "tasks" / "mc1.jsonl").write_text('{"query": "q", "choices": [" a", " b"], "gold": 5}\n')
    (W / "tasks" / "mc2.jsonl").write_text('{"query": "q", "choices": [" a", " b"], "gold": 0}\n[1]\n')
    rep = W / "rep"
    rep.mkdir()
    (rep / "pruning_report.json").write_bytes(GARB)
    rep2 = W / "rep2"
    rep2.mkdir()
    (rep2 / "pruning_report.json").write_text(json.dumps({"params_before": "many", "params_after": [1]}))
    rep3 = W / "rep3"
    rep3.mkdir()
    (rep3 / "pruning_report.json").write_text("[1]")
    (W / "prompts-empty.txt").write_text("\n\n")

    pruned = save_pruned(tiny_model("llama-gqa"), W / "pruned", record=blank_record())
    for f in tiny.glob("tokenizer*"):
        (pruned / f.name).write_bytes(f.read_bytes())
    hd = W / "headdim"
    hd.mkdir()
    for f in pruned.iterdir():
        (hd / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((hd / "config.json").read_text())
    (hd / "config.json").write_text(json.dumps({**cfg, "head_dim": 8}))
    nocfg = W / "nocfg"
    nocfg.mkdir()
    (nocfg / "model.safetensors").write_bytes(b"x")
    trunc = W / "trunc"
    trunc.mkdir()
    for f in pruned.iterdir():
        (trunc / f.name).write_bytes(f.read_bytes())
    (trunc / "model.safetensors").write_bytes((pruned / "model.safetensors").read_bytes()[:200])
    (W / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    rc = W / "remote"
    rc.mkdir()
    (rc / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "c.EvilConfig"}}))
    (rc / "c.py").write_text("import pathlib; pathlib.Path('PWNED').write_text('x')\n")
    (rc / "model.safetensors").write_bytes(b"")
    cache = W / "cache" / "smollm2-135m"
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{bad")

    T, OUT = str(tiny), str(W / "out")
    P = ["prune", "--model", T, "--output", OUT, "--criterion", "l1", "--samples", "0"]
    CASES = [
        ("prune --ratio 1.2", [*P, "--ratio", "1.2"]),
        ("prune --ratio 0", [*P, "--ratio", "0"]),
        ("prune --ratio -0.1", [*P, "--ratio", "-0.1"]),
        ("prune --ratio abc", [*P, "--ratio", "abc"]),
        ("prune --layers 2:9", [*P, "--layers", "2:9"]),
        ("prune --layers 3:1", [*P, "--layers", "3:1"]),
        ("prune --layers x", [*P, "--layers", "x"]),
        ("prune --attn-layers 0:99", [*P, "--attention", "kv", "--attn-layers", "0:99"]),
        ("prune --criterion magic", [*P, "--criterion", "magic"]),
        ("prune --reduction avg", [*P, "--reduction", "avg"]),
        ("prune --scope heads", [*P, "--scope", "heads"]),
        ("prune --attention all", [*P, "--attention", "all"]),
        ("prune --layout uniform --layers 1:3", [*P, "--layout", "uniform", "--layers", "1:3"]),
        ("prune --scope block --attention none --no-mlp", [*P, "--attention", "none", "--no-mlp"]),
        ("prune --steps 0", [*P, "--steps", "0"]),
        ("prune --min-keep 1.5", [*P, "--min-keep", "1.5"]),
        ("prune --min-keep -1", [*P, "--min-keep", "-1"]),
        ("prune --round-to 0", [*P, "--round-to", "0"]),
        ("prune --batch-size 0", [*P, "--batch-size", "0"]),
        ("prune --seed -1", [*P, "--seed", "-1"]),
        ("prune --num-samples 0", [*P, "--num-samples", "0"]),
        ("prune --seq-len 1", [*P, "--seq-len", "1"]),
        ("prune --seq-len 100000 (> max_position_embeddings)", [*P, "--seq-len", "100000"]),
        ("prune --eval-tokens -1", [*P, "--eval-tokens", "-1"]),
        ("prune --samples -2", [*P, "--samples", "-2"]),
        ("prune --ratio 0.95 --mlp-layers 0:1", [*P, "--ratio", "0.95", "--mlp-layers", "0:1"]),
        ("prune --calibration missing.jsonl", [*P[:-4], "--calibration", "missing.jsonl"]),
        ("prune --calibration garbage.jsonl (binary)", [*P[:-4], "--calibration", "garbage.jsonl"]),
        ("prune --calibration mixed.jsonl (dict then list)", [*P[:-4], "--calibration", "mixed.jsonl"]),
        ("prune --calibration scalar.json", [*P[:-4], "--calibration", "scalar.json"]),
        ("prune --calibration empty.txt", [*P[:-4], "--calibration", "empty.txt"]),
        ("prune --calibration nofield.jsonl", [*P[:-4], "--calibration", "nofield.jsonl"]),
        ("prune --eval-data ./wiki.txt (missing)", [*P, "--eval-data", "./wiki.txt"]),
        ("prune --eval-data garbage.jsonl", [*P, "--eval-data", "garbage.jsonl"]),
        ("prune --output afile (a file)", [*P[:4], str(W / "afile"), *P[5:]]),
        ("prune --output afile/sub (parent is a file)", [*P[:4], str(W / "afile" / "sub"), *P[5:]]),
        ("prune --output user/ (user files, no --overwrite)", [*P[:4], str(W / "user"), *P[5:]]),
        ("prune --output user/ --overwrite (user files)", [*P[:4], str(W / "user"), *P[5:], "--overwrite"]),
        (
            "prune --model parent/base --output parent --overwrite",
            [
                "prune",
                "--model",
                str(W / "parent" / "base"),
                "--output",
                str(W / "parent"),
                "--overwrite",
                "--criterion",
                "l1",
            ],
        ),
        (
            "prune --model parent/base --output parent/base --overwrite",
            [
                "prune",
                "--model",
                str(W / "parent" / "base"),
                "--output",
                str(W / "parent" / "base"),
                "--overwrite",
                "--criterion",
                "l1",
            ],
        ),
        (
            "prune --model parent/base --output parent/base/sub",
            [
                "prune",
                "--model",
                str(W / "parent" / "base"),
                "--output",
                str(W / "parent" / "base" / "sub"),
                "--criterion",
                "l1",
            ],
        ),
        ("prune --output . --overwrite", [*P[:4], ".", *P[5:], "--overwrite"]),
        ("prune --output .. --overwrite", [*P[:4], "..", *P[5:], "--overwrite"]),
        (
            "prune --model modles/base (typo, offline)",
            ["prune", "--model", "modles/base", "--output", OUT, "--criterion", "l1"],
        ),
        ("prune --model ./nope", ["prune", "--model", "./nope", "--output", OUT]),
        ("prune --model a/b/c", ["prune", "--model", "a/b/c", "--output", OUT]),
        ("prune --model bad.gguf", ["prune", "--model", "bad.gguf", "--output", OUT, "--criterion", "l1"]),
        ("prune --model missing.gguf", ["prune", "--model", "missing.gguf", "--output", OUT]),
        (
            "prune --model folder without config.json",
            ["prune", "--model", str(nocfg), "--output", OUT, "--criterion", "l1"],
        ),
        (
            "prune --model truncated safetensors",
            ["prune", "--model", str(trunc), "--output", OUT, "--criterion", "l1", "--seq-len", "32"],
        ),
        ("prune --model remote-code folder", ["prune", "--model", str(rc), "--output", OUT, "--criterion", "l1"]),
        (
            "prune --model smollm2-135m (damaged cache)",
            ["prune", "--model", "smollm2-135m", "--output", OUT, "--criterion", "l1"],
        ),
        ("eval ppl --max-tokens -5", ["eval", "ppl", "--model", T, "--data", "wikitext2", "--max-tokens", "-5"]),
        ("eval ppl --max-tokens 0", ["eval", "ppl", "--model", T, "--data", "wikitext2", "--max-tokens", "0"]),
        ("eval ppl --seq-len 1", ["eval", "ppl", "--model", T, "--data", "wikitext2", "--seq-len", "1"]),
        ("eval ppl --seq-len 4096 (> 512)", ["eval", "ppl", "--model", T, "--data", "wikitext2", "--seq-len", "4096"]),
        ("eval ppl --data missing.raw", ["eval", "ppl", "--model", T, "--data", "missing.raw"]),
        ("eval ppl --data garbage.jsonl", ["eval", "ppl", "--model", T, "--data", "garbage.jsonl"]),
        ("eval ppl --data mixed.jsonl", ["eval", "ppl", "--model", T, "--data", "mixed.jsonl"]),
        ("eval ppl --data empty.txt", ["eval", "ppl", "--model", T, "--data", "empty.txt"]),
        (
            "eval ppl --model head_dim edited",
            ["eval", "ppl", "--model", str(hd), "--data", "wikitext2", "--seq-len", "32"],
        ),
        ("eval ppl --model remote-code folder", ["eval", "ppl", "--model", str(rc), "--data", "wikitext2"]),
        ("eval tasks --tasks ,", ["eval", "tasks", "--model", T, "--tasks", ","]),
        ("eval tasks --limit 0", ["eval", "tasks", "--model", T, "--tasks", "piqa", "--limit", "0"]),
        ("eval tasks --batch-size 0", ["eval", "tasks", "--model", T, "--tasks", "piqa", "--batch-size", "0"]),
        (
            "eval tasks --output results/ (a folder)",
            ["eval", "tasks", "--model", T, "--tasks", "mc1", "--data-dir", "tasks", "--output", "results"],
        ),
        (
            "eval tasks --output nodir/x.json",
            ["eval", "tasks", "--model", T, "--tasks", "mc1", "--data-dir", "tasks", "--output", "nodir/x.json"],
        ),
        (
            "eval tasks piqa.jsonl of binary garbage",
            ["eval", "tasks", "--model", T, "--tasks", "piqa", "--data-dir", "tasks"],
        ),
        ("eval tasks gold out of range", ["eval", "tasks", "--model", T, "--tasks", "mc1", "--data-dir", "tasks"]),
        ("eval tasks a list line", ["eval", "tasks", "--model", T, "--tasks", "mc2", "--data-dir", "tasks"]),
        ("eval tasks unknown task file", ["eval", "tasks", "--model", T, "--tasks", "nosuch", "--data-dir", "tasks"]),
        ("report garbage pruning_report.json", ["report", str(rep)]),
        ("report wrong types", ["report", str(rep2)]),
        ("report a list", ["report", str(rep3)]),
        ("report not a folder", ["report", "afile"]),
        ("report no report", ["report", str(W / "user")]),
        ("report --max-new-tokens 0", ["report", str(pruned), "--max-new-tokens", "0"]),
        ("report --prompts empty file", ["report", str(pruned), "--dense", T, "--prompts", "prompts-empty.txt"]),
        ("report --prompts without --dense", ["report", str(pruned), "--prompts", "afile"]),
        ("generate --prompt ''", ["generate", "--model", T, "--prompt", ""]),
        ("generate --max-new-tokens 0", ["generate", "--model", T, "--prompt", "Hi", "--max-new-tokens", "0"]),
        ("generate --max-new-tokens -1", ["generate", "--model", T, "--prompt", "Hi", "--max-new-tokens", "-1"]),
    ]

    return CASES


def snapshot(W: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in W.rglob("*")
        if p.is_file() and "cache" not in p.parts
    }


def run_table(W: Path) -> list[tuple[str, object, bool, bool, str]]:
    rows = []
    for name, argv in cases(W):
        before = snapshot(W)
        err = io.StringIO()
        out = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        except Exception:
            code = "traceback"
            err.write(traceback.format_exc())
        after = snapshot(W)
        text = err.getvalue().strip().splitlines()
        last = text[-1] if text else ""
        clean = (last.startswith("error:") or "error: argument" in last) and "Traceback" not in err.getvalue()
        same = before == after and not (W / "out").exists() and not Path("PWNED").exists()
        ok = code == 2 and clean and same
        rows.append((name, code, ok, same, last[:150]))
    return rows


def test_every_bad_input_is_a_clear_error(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LLMP_TRUST_REMOTE_CODE", raising=False)
    rows = run_table(tmp_path)
    assert len(rows) >= 80
    bad = [row for row in rows if not row[2]]
    assert not bad, bad


if __name__ == "__main__":
    W = Path(sys.argv[1])
    W.mkdir(parents=True, exist_ok=True)
    os.chdir(W)
    os.environ.update(LLMP_CACHE=str(W / "cache"), HF_HUB_OFFLINE="1")
    rows = run_table(W)
    print("| # | input | exit | handled | files unchanged | message |")
    print("|---|---|---|---|---|---|")
    for i, (name, code, ok, same, msg) in enumerate(rows, 1):
        print(
            f"| {i} | `{name}` | {code} | {'yes' if ok else 'NO'} | {'yes' if same else 'NO'} | {msg.replace('|', '/')} |"
        )
    print(f"\n{sum(r[2] for r in rows)} of {len(rows)} handled")
