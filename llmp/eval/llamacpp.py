"""llama.cpp itself, through ``llama-cpp-python``: logits, greedy text, perplexity and speed of a GGUF.

These check an export against the engine that serves it, not against llmp's own reading of the
file. The perplexity follows llmp's protocol (:mod:`llmp.eval.perplexity`): the same token ids,
non-overlapping windows, no BOS, so the two numbers differ only by the engines' arithmetic.

Needs ``llama-cpp-python`` (``pip install llama-cpp-python``: it compiles llama.cpp, about 6
minutes on 2 cores; ``.ci/run`` caches the wheel).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmp.errors import LlmpError


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCpp:
    """A GGUF loaded in llama.cpp, on the CPU, with every position's logits kept.

    ``f32_cache`` keeps the attention keys and values in float32, so that an f32 file computes in
    f32 throughout (llama.cpp's own default, an f16 cache, moves logits by ~1e-3 of their range).
    ``all_logits`` off computes the output head for the last position only, as a server does
    (:meth:`speed`); :meth:`logits` and :meth:`perplexity` need it on.

    Example::

        engine = LlamaCpp("out/p.gguf", n_ctx=512)
        logits = engine.logits([504, 3575, 282])      # (3, vocab) float32
    """

    def __init__(
        self,
        path: str | Path,
        n_ctx: int = 512,
        threads: int | None = None,
        f32_cache: bool = True,
        all_logits: bool = True,
    ):
        try:
            import llama_cpp
        except ImportError as err:
            raise LlmpError("llama.cpp is not installed: pip install llama-cpp-python (it compiles llama.cpp)") from err
        if not Path(path).is_file():
            raise LlmpError(f"no GGUF file at {path}")
        self.threads = threads or len(os.sched_getaffinity(0))
        self.n_ctx = n_ctx
        self.llm = llama_cpp.Llama(
            str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            logits_all=all_logits,
            verbose=False,
            **({"type_k": 0, "type_v": 0} if f32_cache else {}),  # 0: GGML_TYPE_F32
        )

    def close(self) -> None:
        """Free the model now (llama-cpp-python's own finaliser fails at interpreter exit)."""
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=False)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of ``tokens`` (a fresh context), shape ``(len(tokens), vocab)``."""
        if len(tokens) > self.n_ctx:
            raise LlmpError(f"{len(tokens)} tokens exceed the context of {self.n_ctx} this engine was opened with")
        self.llm.reset()
        self.llm.eval(list(tokens))
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def greedy(self, tokens: Sequence[int], new_tokens: int) -> list[int]:
        """``new_tokens`` greedy continuations of ``tokens``, decoded one token at a time."""
        self.llm.reset()
        self.llm.eval(list(tokens))
        out = []
        for _ in range(new_tokens):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([out[-1]])
        return out

    def perplexity(self, ids: Sequence[int], seq_len: int = 128) -> tuple[float, int]:
        """(perplexity, windows) of ``ids`` by llmp's protocol: non-overlapping windows, mean next-token NLL.

        Raises:
            LlmpError: ``ids`` is shorter than one window.
        """
        windows = len(ids) // seq_len
        if windows == 0:
            raise LlmpError(f"the text has {len(ids)} tokens, fewer than one window of `seq_len` {seq_len}")
        total = 0.0
        for w in range(windows):
            window = list(ids[w * seq_len : (w + 1) * seq_len])
            logits = self.logits(window)[:-1].astype(np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            total += float((log_z - logits[np.arange(seq_len - 1), window[1:]]).sum())
        return math.exp(total / (windows * (seq_len - 1))), windows

    def speed(self, prefill: int = 512, decode: int = 128, repeats: int = 3) -> dict:
        """Tokens/s of a ``prefill``-token prompt and of ``decode`` tokens generated one at a time
        after it (best of ``repeats``; token ids are arbitrary, the work is what counts)."""
        if prefill + decode > self.n_ctx:
            raise LlmpError(f"prefill {prefill} + decode {decode} exceed the context of {self.n_ctx}")
        prompt = [(7 * i + 11) % 1000 + 100 for i in range(prefill)]
        best_prefill = best_decode = math.inf
        for _ in range(repeats):
            self.llm.reset()
            t0 = time.perf_counter()
            self.llm.eval(prompt)
            t1 = time.perf_counter()
            for i in range(decode):
                self.llm.eval([(13 * i + 5) % 1000 + 100])
            t2 = time.perf_counter()
            best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
        return {
            "prefill_tokens_per_s": round(prefill / best_prefill, 1),
            "decode_tokens_per_s": round(decode / best_decode, 1),
            "threads": self.threads,
        }
