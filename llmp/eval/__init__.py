"""Evaluation: perplexity and zero-shot tasks (lm-evaluation-harness is imported only when used)."""

from llmp.eval.perplexity import PerplexityResult, perplexity
from llmp.eval.tasks import TaskResult, TaskResults, evaluate_tasks

__all__ = ["PerplexityResult", "TaskResult", "TaskResults", "evaluate_tasks", "perplexity"]
