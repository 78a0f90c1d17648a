"""``llmp export``: a model folder for a serving engine (GGUF for llama.cpp, DeciLM for vLLM)."""

from __future__ import annotations

import time


def add_parser(sub) -> None:
    x = sub.add_parser(
        "export",
        help="write a model folder for a serving engine: GGUF (llama.cpp) or DeciLM (vLLM)",
        description="GGUF: llama.cpp's `deci` architecture, every layer with its own head, KV-head and MLP "
        "counts. DeciLM: a folder vLLM's DeciLMForCausalLM serves (equal query heads in every layer).",
    )
    x.add_argument(
        "dir", help="folder written by `llmp prune` or `llmp fit`, a Hugging Face folder, or a built-in name"
    )
    x.add_argument("--format", required=True, help="gguf (llama.cpp) or decilm (vLLM)")
    x.add_argument("--output", required=True, help="the .gguf file (gguf) or the folder (decilm) to write")
    x.add_argument(
        "--dtype",
        default="auto",
        help="weights: auto (as stored), f32, f16, bf16, or q8_0 (gguf only; norms and biases stay f32)",
    )
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export that llmp wrote")


def run(args) -> int:
    from llmp.export import export

    t0 = time.perf_counter()
    result = export(args.dir, args.format, args.output, args.dtype, args.overwrite)
    size = sum(p.stat().st_size for p in ([result.path] if result.path.is_file() else result.path.rglob("*")))
    print(
        f"wrote {result.path} ({args.format}, {result.details['dtype']}, {size / 2**20:,.1f} MiB) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    for note in result.details.get("notes", []):
        print(note)
    return 0
