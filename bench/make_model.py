"""Write a random-initialised model of a real model's shape, for memory and time benchmarks.

    python bench/make_model.py --shape tinyllama-1.1b --dtype float32 --output /tmp/tinyllama-fp32

The weights are random (the model measures memory and time, not quality). The tokenizer is a
byte-level BPE trained on the built-in C4 sample, so calibration and perplexity text tokenizes
into ids inside the model's vocabulary. Prints one JSON object (parameters, bytes on disk).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SHAPES = {
    # a few layers of Llama for the GPU check's CPU dry run (bench/gpu_check.py --dry-run)
    "tiny-llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    # TinyLlama-1.1B (Llama layout, GQA 32/4): 1.10B parameters
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # Llama-2-7B: 6.74B parameters
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # OLMoE-1B-7B: 16 layers of 64 experts (width 1024, top-8), 6.92B parameters
    "olmoe-1b-7b": dict(
        model_type="olmoe",
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        vocab_size=50304,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
}


def tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from llmp.data.resources import BUILTIN_DATA
    from llmp.data.text import read_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["</s>"]
    )
    tok.train_from_iterator(read_documents(BUILTIN_DATA["c4"]), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    shape = dict(SHAPES[args.shape])
    config = AutoConfig.for_model(shape.pop("model_type", "llama"), **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(getattr(torch, args.dtype))
    model.to_empty(device="cpu")  # allocated in the target dtype: a 7B bf16 model needs 13.5 GB, not 27
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # (OLMoE's q_norm / k_norm too)
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.initializer_range)
    model.config.dtype = args.dtype
    out = Path(args.output)
    model.save_pretrained(out)
    tokenizer(config.vocab_size).save_pretrained(out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    result = {
        "shape": args.shape,
        "dtype": args.dtype,
        "params": sum(p.numel() for p in model.parameters()),
        "safetensors_gb": round(size / 1024**3, 3),
        "seconds": round(time.perf_counter() - t0, 1),
        "output": str(out),
    }
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
