"""Evaluation: perplexity (GPTQ-paper protocol) and agreement with a reference model."""

from llmq.eval.perplexity import EvalResult, ReferenceLogProbs, evaluate

__all__ = ["EvalResult", "ReferenceLogProbs", "evaluate"]
