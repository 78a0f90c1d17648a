"""Evaluation: perplexity (and, later, zero-shot tasks)."""

from llmp.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
