"""Evaluation: perplexity (GPTQ-paper protocol) and agreement with a reference model."""

from llmq.eval.perplexity import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]
