"""Check every CUDA path of llmp in one command, on a lent GPU, in minutes.

    python bench/gpu_check.py [--work DIR] [--steps tests,prune,zero,ddp,vllm] [--dry-run]

Each step runs in a child process (a CUDA failure cannot take the next steps with it), prints one
JSON line (``step``, ``ok``, ``seconds``, its measurements or the error's last lines) and the
next step runs whatever happened:

1. ``tests``  the test suite's CUDA tests (``-m gpu``: they skip without CUDA), with their counts;
2. ``prune``  a Llama-2-7B-shaped random model written in bf16, pruned by 20% streamed with one
   layer on the GPU, and in memory with Taylor and with the default criterion (flap + lstsq):
   time, peak GPU memory against the weights' bytes, host RSS;
3. ``zero``   recovery on one GPU under the stock Lightning DeepSpeed strategy, ZeRO-2 and ZeRO-3,
   LoRA and full, with distillation from the dense model, a few steps on a TinyLlama-1.1B shape
   in bf16-mixed: tokens/s, peak GPU memory, and the consolidated checkpoint exported to a pruned
   folder that loads;
4. ``ddp``    the same recovery under DDP with one process against a bare PyTorch loop (forward,
   backward, AdamW) on the same batches (``bench/recover.py``): the throughput ratio;
5. ``vllm``   the DeciLM export served by vLLM, if vLLM is importable there (it is not carried).

``--dry-run`` runs the same steps on the CPU with tiny shapes (CI runs it, so the script cannot
rot between GPU runs). Meant to fit in 8 minutes of an H100, model writes included, with a few
steps and a 7-minute limit per child; it has not run on a GPU yet, so its time there is not
measured: ``--steps`` reruns only some (docs/benchmarks/gpu.md has the table the lines fill). The wheels llmp needs beyond that machine's
own packages come from ``bash bench/gpu_wheels.sh`` (install them first: see the docs page).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
STEPS = ("tests", "prune", "zero", "ddp", "vllm")


def run(command: list, timeout: float, env: dict | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``command``, killed after ``timeout`` seconds (code 124)."""
    try:
        done = subprocess.run(
            [str(c) for c in command],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
        return done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as err:
        return 124, str(err.stdout or ""), f"timed out after {timeout:.0f} s"


def last_json(text: str) -> dict:
    """The last JSON object a bench script printed (one line, or indented over several)."""
    start = text.rfind("\n{")
    start = 0 if start < 0 and text.startswith("{") else start + 1
    return json.loads(text[start:])


def report(step: str, started: float, result: dict | None = None, error: str | None = None) -> dict:
    line = {"step": step, "ok": error is None, "seconds": round(time.perf_counter() - started, 1)}
    line.update({"result": result} if error is None else {"error": error[-2000:]})
    print(json.dumps(line), flush=True)
    return line


class Check:
    """The shapes, device and strategies of one run (the GPU's, or the dry run's tiny CPU ones)."""

    def __init__(self, work: Path, dry: bool) -> None:
        self.work, self.dry = work, dry
        self.device = "cpu" if dry else "cuda"
        self.big, self.small = ("tiny-llama", "tiny-llama") if dry else ("llama-7b", "tinyllama-1.1b")
        self.zero = "llmp_deepspeed_stage_{}" if dry else "deepspeed_stage_{}"  # the stock strategy on a GPU
        self.precision = "32-true" if dry else "bf16-mixed"
        self.timeout = 600 if dry else 420

    def model(self, shape: str, dtype: str) -> Path:
        folder = self.work / f"{shape}-{dtype}"
        if not (folder / "config.json").is_file():
            make = [sys.executable, BENCH / "make_model.py", "--shape", shape, "--dtype", dtype, "--output", folder]
            code, _, err = run(make, self.timeout)
            if code:
                raise RuntimeError(f"make_model {shape}: {err[-1500:]}")
        return folder

    def tests(self) -> dict:
        collect = ["--collect-only"] if self.dry else []
        code, out, err = run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *collect,
                              ROOT / "tests"], self.timeout)  # fmt: skip
        if code not in (0, 5):  # 5: nothing collected
            raise RuntimeError(out[-1500:] + err[-500:])
        return {"summary": (out.strip().splitlines() or [""])[-1]}

    def prune(self) -> dict:
        folder = self.model(self.big, "bfloat16")
        weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        results = {"weights_gb": round(weights / 2**30, 3)}
        scale = [sys.executable, BENCH / "scale.py", "--shape", self.big, "--dtype", "bfloat16", "--folder", folder,
                 "--device", self.device, "--output", self.work / "streamed"]  # fmt: skip
        code, out, err = run(scale, self.timeout)
        results["streamed"] = last_json(out) if code == 0 else {"error": err[-1000:]}
        for criterion in ("taylor", "flap"):
            args = ["--model", folder, "--ratio", "0.2", "--criterion", criterion, "--no-ppl", "--device", self.device]
            code, out, err = run([sys.executable, BENCH / "prune.py", *args], self.timeout)
            results[f"in_memory_{criterion}"] = last_json(out) if code == 0 else {"error": err[-1000:]}
        if any("error" in v for v in results.values() if isinstance(v, dict)):
            raise RuntimeError(json.dumps(results))
        return results

    def zero_recipe(self, folder: Path, stage: int, mode: str) -> Path:
        out = self.work / f"zero{stage}-{mode}"
        recipe = {
            "model": {"model": str(folder), "mode": mode, "learning_rate": 1e-4, "warmup_steps": 1,
                      "distill": {"weight": 0.5}},
            "trainer": {
                "accelerator": self.device, "devices": 1, "strategy": self.zero.format(stage),
                "precision": self.precision, "max_steps": 4, "limit_val_batches": 1, "logger": False,
                "enable_checkpointing": False, "enable_progress_bar": False,
                "callbacks": [{"class_path": "llmp.callbacks.StructuredPruning",
                               "init_args": {"config": {"ratio": 0.2}, "num_samples": 4, "seq_len": 128}}],
            },
            "data": {"path": "c4-train", "cutoff_len": 256, "val_size": 8, "batch_size": 4},
            "output": str(out),
            "overwrite": True,
        }  # fmt: skip
        path = self.work / f"zero{stage}-{mode}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    def zero_run(self) -> dict:
        folder, results = self.model(self.small, "bfloat16"), {}
        for stage, mode in ((2, "lora"), (2, "full"), (3, "lora"), (3, "full")):
            recipe = self.zero_recipe(folder, stage, mode)
            code, out, err = run([sys.executable, __file__, "--fit-child", recipe], self.timeout)
            results[f"zero{stage}_{mode}"] = last_json(out) if code == 0 else {"error": (out + err)[-1500:]}
        if any("error" in v for v in results.values()):
            raise RuntimeError(json.dumps(results))
        return results

    def ddp(self) -> dict:
        folder = self.model(self.small, "bfloat16")
        args = ["--model", folder, "--mode", "lora", "--data", "c4-train", "--variants", "bare,ce",
                "--steps", "4" if self.dry else "10", "--rounds", "1", "--device", self.device, "--strategy", "ddp",
                "--precision", "32-true" if self.dry else "bf16-true"]  # fmt: skip
        code, out, err = run([sys.executable, BENCH / "recover.py", *args], self.timeout)
        if code:
            raise RuntimeError(err[-1500:])
        return last_json(out)

    def vllm(self) -> dict:
        code, _, _ = run([sys.executable, "-c", "import vllm"], 120)
        if code:
            return {"skipped": "vLLM is not installed here (its wheels exceed what can be carried)"}
        code, out, err = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", ROOT / "tests" / "test_vllm.py"],
                             self.timeout)  # fmt: skip
        if code:
            raise RuntimeError(out[-1500:] + err[-500:])
        return {"summary": (out.strip().splitlines() or [""])[-1]}


def fit_child(recipe: Path) -> None:
    """One `llmp fit` in this process: its time, throughput and GPU peak, and whether its folder loads."""
    import torch

    from llmp import load_pruned
    from llmp.fit import main

    config = yaml.safe_load(recipe.read_text())
    start = time.perf_counter()
    code = main(["--config", str(recipe)])
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(code)
    out = Path(config["output"])
    record = json.loads((out / "pruning_report.json").read_text())
    recovery = record["recovery"]
    tokens = recovery["optimizer_steps"] * config["data"]["batch_size"] * config["data"]["cutoff_len"]
    model = load_pruned(out)
    result = {
        "fit_s": recovery["fit_s"],
        "command_s": round(seconds, 1),
        "tokens_per_s": round(tokens / recovery["fit_s"], 1),
        "strategy": recovery["strategy"],
        "precision": recovery["precision"],
        "achieved_ratio": record["achieved_ratio"],
        "loads": sum(p.numel() for p in model.parameters()) == record["params_after"],
        "cuda_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="where models and outputs go (default: bench/work/gpu-check)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny shapes")
    parser.add_argument("--fit-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fit_child:
        return fit_child(args.fit_child)
    steps = args.steps.split(",")
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"--steps: unknown {sorted(unknown)}; choose from {', '.join(STEPS)}")
    work = Path(args.work or BENCH / "work" / ("gpu-check-dry" if args.dry_run else "gpu-check"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(work, args.dry_run)
    import torch

    print(json.dumps({"step": "machine", "dry_run": args.dry_run, "torch": torch.__version__,
                      "cuda": torch.cuda.is_available(), "device": torch.cuda.get_device_name(0)
                      if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads()}), flush=True)  # fmt: skip
    actions = {"tests": check.tests, "prune": check.prune, "zero": check.zero_run, "ddp": check.ddp, "vllm": check.vllm}
    failed = 0
    for step in steps:
        started = time.perf_counter()
        try:
            report(step, started, actions[step]())
        except Exception as err:  # each step survives the one before it
            failed += 1
            report(step, started, error=f"{type(err).__name__}: {err}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
