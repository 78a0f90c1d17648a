"""The pruning report a person reads: ``report.md`` and ``report.png`` in a pruned model folder.

It is made from the folder's :class:`~llmp.record.PruningRecord` (``pruning_report.json``, written
by ``llmp prune`` and ``llmp fit``), its ``config.json`` and any ``tasks*.json`` written by
``llmp eval tasks --output``::

    report.md   parameters before/after, settings, kept heads and MLP channels per layer,
                perplexity dense -> pruned (-> recovered), recovery settings, zero-shot scores,
                greedy generations side by side
    report.png  kept / dense attention heads and MLP channels for every layer

Optional entries of the record that are shown when present: ``perplexity`` (any of dense,
pruned, recovered), ``recovery`` (settings of the recovery run, shown as a table),
``generations`` (any number of labelled models) and ``timings``. A task file
``tasks_<label>.json`` becomes the column ``<label>`` of the task table (``tasks.json``: the
model named inside).

Example::

    record = llmp.prune(model, PruneConfig(ratio=0.2), calib)
    save_pruned(model, "out/p20", tokenizer, record)
    write_report("out/p20")  # -> (out/p20/report.md, out/p20/report.png)
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from pathlib import Path

from llmp.errors import LlmpError
from llmp.outdir import write_atomic
from llmp.record import Generations, Perplexity, PruningRecord, read_record

log = logging.getLogger(__name__)


def layer_shapes(model) -> list[dict[str, int]]:
    """Per-layer head, KV-head and MLP-channel counts; keep the dense ones before pruning."""
    from llmp.structure import adapter_for

    return adapter_for(model).layer_shapes(model)


def repeated_ngrams(text: str, n: int = 3) -> float:
    """Fraction of word ``n``-grams that already occurred earlier in ``text``: 0 fresh, near 1 looping."""
    words = re.findall(r"\n|\S+", text)  # a newline is a word: loops of blank lines count too
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)


def dense_shapes(record: PruningRecord, folder: Path) -> list[dict[str, int]] | None:
    """The dense per-layer counts: recorded since llmp prune and fit keep them, else (older folders)
    the counts of the folder's config, which a heterogeneous folder keeps as the family's dense ones."""
    if record.dense_layer_shapes:
        return record.dense_layer_shapes
    if not record.layer_shapes or record.loads_with_plain_transformers:
        return None  # a uniform folder's config holds the pruned counts
    try:  # the dense model's skeleton on the meta device: no weights, any family the adapters know
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from llmp.structure import adapter_for

        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        dense = adapter_for(model).layer_shapes(model)
    except Exception:  # a config transformers cannot build: kept counts only
        return None
    kept = record.layer_shapes
    if len(dense) != len(kept) or any(k[key] > d[key] for k, d in zip(kept, dense, strict=True) for key in d):
        return None
    return dense


def read_task_results(folder: Path) -> list[dict]:
    """``tasks*.json`` files of ``folder`` (from ``llmp eval tasks --output``), in name order.

    Each gets a ``label``: ``dense`` for ``tasks_dense.json``, else the model named inside.

    Raises:
        LlmpError: a file is not JSON or not a task result.
    """
    results = []
    for path in sorted(folder.glob("tasks*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise LlmpError(f"{path} is not JSON ({err}); re-create it with `llmp eval tasks --output`") from err
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
            raise LlmpError(f"{path} holds no `tasks` object; re-create it with `llmp eval tasks --output`")
        suffix = path.stem[len("tasks") :].lstrip("_-.")
        results.append({**data, "label": suffix or data.get("model") or path.stem})
    return results


def write_report(folder: str | Path, generations: Generations | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.png`` into ``folder``, each atomically.

    Args:
        folder: a folder holding ``pruning_report.json`` (from ``llmp prune`` or ``llmp fit``).
        generations: side-by-side generations; default: the record's, if any.

    Returns:
        The paths of ``report.md`` and ``report.png``.

    Raises:
        LlmpError: ``folder`` has no readable pruning record, or a ``tasks*.json`` in it is not valid.
    """
    folder = Path(folder)
    record = read_record(folder)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except json.JSONDecodeError as err:
        raise LlmpError(f"{config_path} is not JSON ({err})") from err
    if not record.layer_shapes and isinstance(config.get("llmp_layer_shapes"), list):
        record.layer_shapes = config["llmp_layer_shapes"]
    generations = generations or record.generations
    tasks = read_task_results(folder)
    md, png = folder / "report.md", folder / "report.png"
    dense = dense_shapes(record, folder)  # both rendered before either is written
    image = io.BytesIO()
    try:
        plot_shapes(record, dense).savefig(image, format="png", dpi=110)
    except ImportError:  # matplotlib is optional where llmp runs with a minimal set (the GPU check)
        log.warning("matplotlib is not installed: %s gets no plot", md)
        image = None
    text = render_markdown(record, dense, tasks, generations, png.name if image is not None else None)
    if image is not None:
        write_atomic(png, image.getvalue())
    write_atomic(md, text)
    return md, png


PANELS = (
    ("heads", "attention heads", "tab:blue"),
    ("mlp", "MLP channels", "tab:orange"),
    ("experts", "experts", "tab:green"),
)
"""Per-layer counts the report draws, each in its own panel when any layer has it (MoE layers have
experts and no MLP channels; a dense layer between them the reverse)."""


def plot_shapes(record: PruningRecord, dense: list[dict] | None):
    """Kept heads, MLP channels and experts per layer as bars over the dense counts (grey), one panel each."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg is used to save

    kept = record.layer_shapes
    layers = list(range(len(kept)))
    searches = [s.allocation for s in record.steps if s.allocation is not None and s.allocation.fitness]
    panels = [p for p in PANELS if any(p[0] in k for k in kept)] or list(PANELS[:2])
    rows = len(panels) + bool(searches)
    fig = Figure(figsize=(max(6.0, 0.32 * len(kept) + 2), 2.8 * rows), layout="constrained")
    axes = list(fig.subplots(rows, 1))
    for ax in axes[1 : len(panels)]:
        ax.sharex(axes[0])
    if searches:
        _plot_fitness(axes[-1], searches)
    if not kept:
        axes[0].text(0.5, 0.5, "no per-layer shapes recorded", ha="center", va="center", transform=axes[0].transAxes)
    for ax, (key, label, color) in zip(axes, panels, strict=False):
        _bars(ax, layers, [k.get(key, 0) for k in kept], [d.get(key, 0) for d in dense] if dense else None, color)
        if key == "heads" and any(k["kv_heads"] != k["heads"] for k in kept):
            ax.plot(layers, [k["kv_heads"] for k in kept], "k_", markersize=10, label="kept KV heads")
        ax.set_ylabel(label)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    last = axes[len(panels) - 1]
    last.set_xlabel("layer")
    last.set_xticks(layers)
    last.tick_params(axis="x", labelsize=7)
    before, after = record.params_before, record.params_after
    title = f"{record.model or 'pruned model'}: kept structures per layer"
    if before and after:
        title += f"\nparameters {before:,} -> {after:,} ({1 - after / before:.1%} removed)"
    fig.suptitle(title, fontsize=10)
    return fig


def _bars(ax, layers: list[int], values: list[int], dense: list[int] | None, color: str) -> None:
    """Kept counts over the dense ones, each shrunk bar labelled with the share kept."""
    if dense:
        ax.bar(layers, dense, color="0.88", edgecolor="0.6", label="dense")
    ax.bar(layers, values, width=0.6, color=color, label="kept")
    for x, (k, d) in enumerate(zip(values, dense or values, strict=True)):
        if k < d:
            ax.text(x, k, f"{k / d:.0%}", ha="center", va="bottom", fontsize=6)


def _plot_fitness(ax, searches) -> None:
    """The allocation search's best KL to the dense model per generation, from its seed's."""
    for number, found in enumerate(searches, 1):
        curve = [found.seed_fitness, *found.fitness]
        ax.plot(range(len(curve)), curve, marker=".", label=f"step {number}" if len(searches) > 1 else None)
    ax.set_xlabel("search generation (0: the seed allocation)")
    ax.set_ylabel("KL to dense")
    ax.set_title("allocation search: best candidate's KL on held-out calibration tokens", fontsize=8)
    if len(searches) > 1:
        ax.legend(fontsize=7)


def render_markdown(
    record: PruningRecord, dense, tasks: list[dict], generations: Generations | None, png: str | None
) -> str:
    """The Markdown summary (see the module docstring)."""
    settings = record.settings
    before, after = record.params_before, record.params_after
    lines = [f"# Pruning report: {record.model or 'model'}", ""]
    lines += [f"![kept structures per layer]({png})", ""] if png else []
    lines += ["| parameters | count |", "| --- | ---: |", f"| before | {before:,} |", f"| after | {after:,} |"]
    asked = settings.get("ratio")
    lines.append(f"| removed | {record.achieved_ratio:.2%}" + (f" (asked {asked:.2%})" if asked else "") + " |")
    lines += ["", "Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items())]
    if record.dtype:
        lines.append(f"Weights saved in `{record.dtype}`.")
    if record.engines:
        lines.append("Loads in: " + ", ".join(record.engines) + ".")
    if (cal := record.calibration) is not None:
        lines.append(f"Calibration: {cal.num_samples} x {cal.seq_len} tokens of `{cal.source}`.")
    for step in record.steps:
        found = step.allocation
        if found is not None and found.fitness:
            lines.append(
                f"Allocation searched: KL to the dense model {found.seed_fitness:.4f} ({found.seed}) -> "
                f"{found.fitness[-1]:.4f} in {found.generations} generations, {found.seconds:.0f} s."
            )
    lines += ["", "## Where the model was cut", "", *_shape_table(record.layer_shapes, dense)]
    lines += _routing_table(record.steps)
    if record.perplexity is not None:
        lines += ["", "## Perplexity", "", *_perplexity_table(record.perplexity)]
    if record.recovery:
        shown = {k: v for k, v in dataclasses.asdict(record.recovery).items() if v is not None}
        lines += ["", "## Recovery", "", *_settings_table(shown)]
    if tasks:
        lines += ["", "## Zero-shot tasks", "", *_task_table(tasks)]
    if generations:
        lines += ["", *_generation_tables(generations)]
    if record.timings:
        lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in record.timings.items())]
    return "\n".join(lines) + "\n"


def _routing_table(steps) -> list[str]:
    """Per MoE layer: how much of the calibration tokens' routing the kept and removed experts had."""
    rows = []
    for step in steps:
        for name, shares in (step.routing or {}).items():
            removed = set(step.plan.get(name, []))
            total = sum(shares) or 1.0
            gone = sum(f for e, f in enumerate(shares) if e in removed) / total
            busiest = max((f for e, f in enumerate(shares) if e in removed), default=0.0)
            rows.append(
                f"| {name} | {len(shares) - len(removed)} of {len(shares)} | {1 - gone:.1%} | {gone:.1%} | {busiest:.2%} |"
            )
    if not rows:
        return []
    head = "| MoE layer | experts kept | routing to kept | routing to removed | busiest removed expert |"
    return ["", "Routing on the calibration text before the removal (share of routed tokens):", "", head,
            "| --- | ---: | ---: | ---: | ---: |", *rows]  # fmt: skip


def _shape_table(kept: list[dict], dense) -> list[str]:
    def cell(k, d, key):
        if key not in k:
            return "–"
        return f"{k[key]}" if d is None else f"{k[key]} / {d[key]} ({k[key] / d[key]:.0%})"

    keys = [("heads", "heads"), ("kv_heads", "KV heads"), ("mlp", "MLP channels"), ("experts", "experts")]
    keys = [(key, name) for key, name in keys if key in ("heads", "kv_heads", "mlp") or any(key in k for k in kept)]
    rows = ["| layer | " + " | ".join(f"{name} kept" for _, name in keys) + " |", "| ---: " * (len(keys) + 1) + "|"]
    for i, k in enumerate(kept):
        d = dense[i] if dense else None
        rows.append(f"| {i} | " + " | ".join(cell(k, d, key) for key, _ in keys) + " |")
    if dense is None:
        rows.append("\n(The dense counts are not recorded in this folder; kept counts only.)")
    return rows


def _perplexity_table(ppl: Perplexity) -> list[str]:
    """One row: dense -> pruned -> recovered (the stages present), with the data and protocol."""
    stages = {k: getattr(ppl, k) for k in ("dense", "pruned", "recovered") if getattr(ppl, k) is not None}
    return [
        "| data | " + " | ".join(stages) + " | protocol |",
        "| --- |" + " ---: |" * len(stages) + " --- |",
        f"| {ppl.data or '-'} | " + " | ".join(f"{v:.2f}" for v in stages.values()) + f" | {ppl.protocol or '-'} |",
    ]


def _settings_table(settings: dict) -> list[str]:
    """``setting | value`` rows; nested objects flattened to ``a.b``."""
    rows = ["| setting | value |", "| --- | --- |"]
    for key, value in _flatten(settings):
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        rows.append(f"| {key} | {_cell(str(shown))} |")
    return rows


def _flatten(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _task_table(results: list[dict]) -> list[str]:
    """Tasks as rows; per result file, ``n``, ``acc`` and ``acc_norm`` columns labelled with its label."""
    labels = [r["label"] for r in results]
    names = list(dict.fromkeys(name for r in results for name in r["tasks"]))
    head = "| task | " + " | ".join(f"n {m} | acc {m} | acc_norm {m}" for m in labels) + " |"
    rows = [head, "| --- |" + " ---: | ---: | ---: |" * len(labels)]
    for name in names:
        cells = []
        for r in results:
            t = r["tasks"].get(name)
            if t is None:
                cells += ["-", "-", "-"]
                continue
            norm = t.get("acc_norm")
            cells += [str(t["n"]), f"{t['acc']:.4f}", "n/a" if norm is None else f"{norm:.4f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows.append("")
    for r in results:
        limit = f"first {r['limit']} items per task" if r.get("limit") else "all items"
        rows.append(
            f"- {r['label']}: `{r.get('model')}`, lm-evaluation-harness {r.get('harness_version', '?')}, {limit}"
        )
    rows += ["", results[0].get("protocol", "")]
    return rows


def _generation_tables(generations: Generations) -> list[str]:
    outputs = generations.outputs
    rows = [
        f"## Generations (greedy, {generations.max_new_tokens} new tokens)",
        "",
        "Repeated 3-grams: share of word 3-grams seen earlier in the same text (looping shows as a high value).",
    ]
    for i, prompt in enumerate(generations.prompts):
        rows += ["", f"**{_cell(prompt)}**", "", "| model | continuation | repeated 3-grams |", "| --- | --- | ---: |"]
        for label, texts in outputs.items():
            text = texts[i] if i < len(texts) else ""
            rows.append(f"| {label} | {_cell(text)} | {repeated_ngrams(text):.0%} |")
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip() or "(empty)"
