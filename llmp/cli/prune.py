"""``llmp prune``: flags onto :func:`llmp.workflow.prune_folder`."""

from __future__ import annotations

import argparse

from llmp.cli.common import add_dtype_arg, add_prune_args, flags_named, prune_config

DEFAULTS_NOTE = (
    "defaults: MLP channels of every layer but the first and last, scored by FLAP's fluctuation on 16 x 128 C4 "
    "tokens layer by layer, the kept columns refit by least squares (docs/pruning.md)"
)
FLAGS = ("model", "output", "calibration", "num_samples", "seq_len", "eval_data", "eval_tokens", "samples", "stream")
FLAGS += ("export", "export_dtype", "overwrite", "dtype")


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model and save it", description=DEFAULTS_NOTE)
    p.add_argument("--model", required=True, help="built-in name (smollm2-135m), model folder, .gguf file or hub id")
    p.add_argument("--output", required=True, help="folder to write (safetensors, config, tokenizer, report)")
    p.add_argument(
        "--calibration",
        default="c4",
        help="calibration text: c4 (built-in sample), a .txt/.jsonl file, or a datasets id",
    )
    p.add_argument("--num-samples", type=int, default=16, help="calibration samples (paper: 10)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample (paper: 64)")
    p.add_argument("--eval-data", help="also measure perplexity before and after on this text (e.g. wikitext2)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="token budget of that perplexity")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--samples", type=int, default=4, help="greedy generations before/after shown in report.md")
    p.add_argument(
        "--stream",
        action="store_true",
        help="never hold the whole model: read, prune and write one decoder layer at a time (a local folder; "
        "criterion flap or wanda; implies --layerwise; no --eval-data, no samples: evaluate the output after)",
    )
    p.add_argument(
        "--export",
        choices=("gguf", "decilm"),
        help="also write OUTPUT.gguf (llama.cpp) or the folder OUTPUT.decilm (vLLM) after saving; "
        "`--target` keeps the pruning inside what that engine loads",
    )
    p.add_argument("--export-dtype", default="auto", help="weights of that export: auto, f32, f16, bf16, q8_0 (gguf)")
    add_dtype_arg(p)
    add_prune_args(p)


def run(args: argparse.Namespace) -> int:
    from llmp.workflow import prune_folder

    config = prune_config(args)
    with flags_named(FLAGS):
        result = prune_folder(config=config, **{name: getattr(args, name) for name in FLAGS})
    record = result.record
    how = ", streamed layer by layer" if args.stream else ""
    experts = f" and {config.experts:.0%} of every MoE layer's experts" if config.experts else ""
    experts += f" and {config.expert_channels:.0%} of every expert's channels" if config.expert_channels else ""
    print(
        f"parameters: {record.params_before:,} -> {record.params_after:,} "
        f"({record.achieved_ratio:.2%} removed, asked {config.fraction:.2%}{experts}) in {result.prune_s:.1f} s{how}"
    )
    if record.perplexity is not None:
        ppl = record.perplexity
        print(f"perplexity on {args.eval_data}: {ppl.dense:.2f} -> {ppl.pruned:.2f} ({ppl.protocol})")
    print(f"saved to {result.output}; summary in {result.report}")
    if result.export is not None:
        print(f"exported to {result.export} ({args.export}, {result.export_details['dtype']})")
        for note in result.export_details.get("notes", []):
            print(note)
    return 0
