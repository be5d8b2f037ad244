"""Quantization methods.  Each turns the linears of one decoder layer into QuantizedTensors.

A method never knows the output format: it returns codes, scales and zeros on a grid.  Each
method owns its recipe keys (``Method.Options``); this registry reads them from a recipe.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmq.errors import LlmqError
from llmq.methods.awq import AWQ, AWQGPTQ
from llmq.methods.base import LayerLog, Method
from llmq.methods.cast import BF16, FP16, FP32
from llmq.methods.gptq import GPTQ
from llmq.methods.rtn import RTN
from llmq.methods.signround import SignRound

METHODS: dict[str, type[Method]] = {m.name: m for m in (RTN, GPTQ, SignRound, AWQ, AWQGPTQ, FP16, BF16, FP32)}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise LlmqError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


def option_names() -> set[str]:
    """Every recipe key some method takes."""
    return {f.name for m in METHODS.values() for f in dataclasses.fields(m.Options)}


def options_for(method: str, given: dict[str, Any]) -> Any:
    """The method's options from the recipe keys ``given`` (unset ones at the method's defaults), checked."""
    cls = method_class(method).Options
    known = {f.name for f in dataclasses.fields(cls)}
    foreign = sorted(set(given) - known)
    if foreign:
        takes = ", ".join(sorted(known)) or "no options"
        raise LlmqError(f"method {method} does not take {', '.join(foreign)} (it takes {takes})")
    for f in dataclasses.fields(cls):
        if f.name in given and not _is(given[f.name], str(f.type)):
            raise LlmqError(f"{f.name} must be {_TYPE_WORDS.get(str(f.type), f.type)}, got {given[f.name]!r}")
    options = cls(**given)
    options.validate()
    return options


_TYPE_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number"}


def _is(value: Any, type_name: str) -> bool:
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


__all__ = ["METHODS", "LayerLog", "Method", "method_class", "option_names", "options_for"]
