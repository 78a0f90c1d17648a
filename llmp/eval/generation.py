"""Greedy generations of fixed prompts: what a person reads beside the numbers of a pruned model.

The prompts go through ``generate`` as one left-padded batch; :func:`samples_entry` turns runs on
the same prompts into the record's :class:`~llmp.record.Generations`.
"""

from __future__ import annotations

from llmp.record import Generations

# Fixed prompts in the spirit of the paper's generation examples (LLM-Pruner, Table 3 and appendix).
DEFAULT_PROMPTS = (
    "AI can create a logo in seconds.",
    "What's great about the holiday season is",
    "Neural sequential models, especially transformers,",
    "The best way to learn a new language is",
)


def generate_samples(model, tokenizer, prompts=DEFAULT_PROMPTS, max_new_tokens: int = 32, count: int | None = None):
    """Greedy continuations of ``prompts`` (the first ``count``), decoded without the prompt.

    The prompts go through ``generate`` as one left-padded batch: one forward per new token for
    all of them, about as fast as a single prompt on a CPU.
    """
    import torch

    prompts = list(prompts)[:count] if count is not None else list(prompts)
    if not prompts:
        return {"prompts": prompts, "max_new_tokens": max_new_tokens, "outputs": []}
    was_training, side, pad_token = model.training, tokenizer.padding_side, tokenizer.pad_token
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        tokenizer.padding_side = "left"  # new tokens follow every prompt's last token directly
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
        inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
        model.train(was_training)
    start = inputs.input_ids.shape[1]
    outputs = [tokenizer.decode(row[start:], skip_special_tokens=True) for row in out]
    return {"prompts": prompts, "max_new_tokens": max_new_tokens, "outputs": outputs}


def samples_entry(*runs: dict, labels=("dense", "pruned")) -> Generations:
    """The record's ``generations`` from runs of :func:`generate_samples` on the same prompts."""
    first = runs[0]
    outputs = {label: run["outputs"] for label, run in zip(labels, runs, strict=True)}
    return Generations(first["prompts"], first["max_new_tokens"], outputs)


def compare_generations(models: dict[str, str], prompts=DEFAULT_PROMPTS, max_new_tokens: int = 32) -> Generations:
    """Load each model spec in turn (one in memory at a time) and generate from the same prompts."""
    from llmp.models import load_model

    runs = []
    for spec in models.values():
        model, tokenizer = load_model(spec)
        runs.append(generate_samples(model, tokenizer, prompts, max_new_tokens))
        del model
    return samples_entry(*runs, labels=tuple(models))
