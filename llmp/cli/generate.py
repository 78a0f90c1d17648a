"""``llmp generate``: greedy text generation."""

from __future__ import annotations

from llmp.cli.common import add_dtype_arg
from llmp.errors import LlmpError


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="greedy text generation")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    add_dtype_arg(g)


def run(args) -> int:
    import torch

    from llmp.models import load_model

    if not args.prompt.strip():
        raise LlmpError("`--prompt` is empty; give the text to continue, e.g. --prompt 'The capital of France is'")
    if args.max_new_tokens < 1:
        raise LlmpError(f"`--max-new-tokens` must be at least 1; got {args.max_new_tokens}")
    model, tokenizer = load_model(args.model, args.dtype)
    prompt = args.prompt
    if args.chat and tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    print(tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
    return 0
