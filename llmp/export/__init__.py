"""Exports of a model folder to the engines people serve models with.

* ``gguf``: one file for llama.cpp (architecture ``deci``: per-layer head, KV-head and MLP counts),
  see :mod:`llmp.export.gguf`;
* ``decilm``: a folder for vLLM's ``DeciLMForCausalLM`` (per-layer KV groups and MLP widths, the
  same query heads in every layer), see :mod:`llmp.export.decilm`.

Both read the folder tensor by tensor (:mod:`llmp.export.source`), carry the pruning report
(``llmp.pruning_report`` in the GGUF, ``pruning_report.json`` in the folder) and are written
atomically; ``overwrite`` replaces only an export llmp wrote.

Example::

    llmp.export.export("out/p", "gguf", "out/p.gguf")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmp.errors import LlmpError

Format = Literal["gguf", "decilm"]
FORMATS: tuple[str, ...] = Format.__args__


@dataclass(frozen=True)
class Exported:
    """What an export wrote.

    Attributes:
        path: the file (``gguf``) or folder (``decilm``).
        format: ``gguf`` or ``decilm``.
        details: format-specific facts (dtype, tensors or shards, q8_0 fallbacks, notes for the user).
    """

    path: Path
    format: str
    details: dict = field(default_factory=dict)


def beside(folder: str | Path, format: str) -> Path:
    """Where ``llmp prune --export`` / ``llmp fit --export`` put the export of ``folder``:
    ``out/p`` → ``out/p.gguf`` or the folder ``out/p.decilm``."""
    folder = Path(folder)
    return folder.with_name(folder.name + (".gguf" if format == "gguf" else ".decilm"))


def check_export(
    model: str | Path, format: str, output: str | Path, dtype: str, overwrite: bool, dtype_name: str = "dtype"
) -> Path:
    """Refuse, before reading any weights, an export that cannot be done; return the output's real path.

    ``dtype_name`` is the dtype's argument in messages (``export_dtype`` for ``llmp prune --export``).

    Raises:
        LlmpError: an unknown format or dtype, or an output that may not be written.
    """
    from llmp.export.gguf import GGUF_DTYPES
    from llmp.outcheck import check_output_dir, check_output_path

    if format not in FORMATS:
        raise LlmpError(f"`format` {format!r} is not one llmp exports; choose one of {', '.join(FORMATS)}")
    if format == "decilm":
        if dtype not in ("auto", "f32", "f16", "bf16"):
            raise LlmpError(f"`{dtype_name}` {dtype!r}: a DeciLM folder holds auto, f32, f16 or bf16 weights")
        return check_output_dir(output, overwrite, [model], flag="output")
    if dtype not in GGUF_DTYPES:
        raise LlmpError(
            f"`{dtype_name}` {dtype!r} is not a GGUF type llmp writes; choose one of {', '.join(GGUF_DTYPES)}"
        )
    path = check_output_path(output, [model], flag="output")
    if path.suffix != ".gguf":
        raise LlmpError(f"`output` {output}: a GGUF file's name ends in .gguf, e.g. {Path(output).name}.gguf")
    if path.is_dir():
        raise LlmpError(f"`output` {output} is a folder; give the path of the .gguf file to write")
    if path.exists():
        if not overwrite:
            raise LlmpError(f"`output` {output} exists; choose another path or pass --overwrite")
        if not written_by_llmp(path):
            raise LlmpError(
                f"`output` {output} was not written by `llmp export`, so --overwrite will not replace it: "
                "choose another path, or remove it yourself"
            )
    return path


def written_by_llmp(path: Path) -> bool:
    """Whether ``path`` is a GGUF file that ``llmp export`` wrote (its metadata has llmp's key)."""
    from llmp.export.gguf import EXPORT_KEY

    try:
        import gguf

        return EXPORT_KEY in gguf.GGUFReader(path).fields
    except Exception:  # not a GGUF, or a damaged one: either way not ours to replace
        return False


def export(
    model: str | Path, format: Format, output: str | Path, dtype: str = "auto", overwrite: bool = False
) -> Exported:
    """Export the model folder ``model`` (or a built-in name) to ``output`` in ``format``.

    Args:
        model: a folder from ``llmp prune`` / ``llmp fit``, a Hugging Face folder, or a built-in name.
        format: ``gguf`` or ``decilm``.
        output: the ``.gguf`` file or the folder to write.
        dtype: ``auto`` keeps the weights' dtype; GGUF also takes ``q8_0``.
        overwrite: replace an earlier export llmp wrote.

    Raises:
        LlmpError: see :func:`check_export` and :func:`llmp.export.source.open_source`, and the
            format's own refusals (a shape it cannot express).
    """
    from llmp.export.source import check_tokenizer, open_source
    from llmp.outcheck import check_space, weights_bytes
    from llmp.outdir import write_file, write_folder
    from llmp.outlock import output_lock

    path = check_export(model, format, output, dtype, overwrite)
    moe = moe_source(model, format)
    if moe is not None:
        return _export_moe(moe, model, path, dtype, overwrite)
    source = open_source(model)
    check_tokenizer(source.folder, format)
    check_space(path, weights_bytes([source.folder]), flag="output")
    if format == "decilm":
        from llmp.export.decilm import check_decilm, write_decilm

        check_decilm(source)
        with write_folder(path, overwrite, [model], own_code=["configuration_decilm"]) as tmp:
            details = write_decilm(source, tmp, dtype)
        return Exported(path, format, details)
    from llmp.export.gguf import write_gguf

    with output_lock(path):
        path = check_export(model, format, output, dtype, overwrite)  # again, under the lock
        with write_file(path) as tmp:
            details = write_gguf(source, tmp, dtype, name=Path(str(model)).name)
    return Exported(path, format, details)


def moe_source(model: str | Path, format: str):
    """The folder read for a mixture-of-experts export (:mod:`llmp.export.gguf_moe`), or ``None``
    for another family.

    Raises:
        LlmpError: a MoE model asked for DeciLM, or one llama.cpp cannot run as it is.
    """
    import json

    from llmp.export.gguf_moe import ARCHES, open_moe_source
    from llmp.export.source import _folder

    folder = _folder(model)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise LlmpError(f"cannot read {folder / 'config.json'}: {err}") from err
    if config.get("model_type") not in ARCHES:
        return None
    if format == "decilm":
        raise LlmpError(
            f"{folder} is a mixture-of-experts model ({config['model_type']}); vLLM's DeciLM holds no experts. "
            "vLLM serves the folder itself (its experts are the same in every layer); export gguf for llama.cpp"
        )
    return open_moe_source(folder, config)


def _export_moe(source, model, path: Path, dtype: str, overwrite: bool) -> Exported:
    from llmp.export.gguf_moe import write_moe_gguf
    from llmp.export.source import check_tokenizer
    from llmp.outcheck import check_space, weights_bytes
    from llmp.outdir import write_file
    from llmp.outlock import output_lock

    check_tokenizer(source.folder, "gguf")
    check_space(path, weights_bytes([source.folder]), flag="output")
    with output_lock(path):
        path = check_export(model, "gguf", path, dtype, overwrite)  # again, under the lock
        with write_file(path) as tmp:
            details = write_moe_gguf(source, tmp, dtype, name=Path(str(model)).name)
    return Exported(path, "gguf", details)
