"""Per-module precision rules: ordered regexes over module names; the first rule that matches decides.

A rule says how the modules it matches differ from the recipe:

    match       a regex, searched in the model's module name (model.layers.3.mlp.down_proj, lm_head);
                anchor it with ^ and $ to match whole names
    bits, group_size, sym
                the integer grid (checkpoint formats that store several: gptq, gptq_v2, compressed-tensors)
    type        a GGUF tensor type (a block or float type of --gguf-type), as llama-quantize's --tensor-type
    keep        true: left unquantized, in the recipe's float dtype

On the command line a rule is ``REGEX=key:value,key:value`` or ``REGEX=keep`` (split at the last '=').
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from llmq.errors import LlmqError

KEYS = ("match", "bits", "group_size", "sym", "type", "keep")


@dataclass(frozen=True)
class Rule:
    match: str
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    type: str | None = None
    keep: bool = False

    def __post_init__(self) -> None:
        try:
            re.compile(self.match)
        except re.error as e:
            raise LlmqError(f"rule {self.match!r}: not a regular expression ({e})") from None
        if self.keep and (self.sets_grid or self.type):
            raise LlmqError(f"rule {self.match!r}: keep leaves a module unquantized; it takes no bits, group or type")
        if not (self.keep or self.sets_grid or self.type):
            raise LlmqError(f"rule {self.match!r} changes nothing; give bits, group_size, sym, type or keep")

    @property
    def sets_grid(self) -> bool:
        return self.bits is not None or self.group_size is not None or self.sym is not None

    def matches(self, module: str) -> bool:
        return re.search(self.match, module) is not None

    def to_dict(self) -> dict[str, Any]:
        """The rule as a recipe writes it (unset keys left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) not in (None, False) or f.name == "match"}


def first_match(rules: tuple[Rule, ...], module: str) -> Rule | None:
    return next((r for r in rules if r.matches(module)), None)


def parse_rules(value: Any) -> tuple[Rule, ...]:
    """Rules from a recipe's ``rules:`` list (mappings or command-line strings)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise LlmqError("recipe key 'rules' must be a list of rules")
    return tuple(_rule(v) for v in value)


def _rule(value: Any) -> Rule:
    if isinstance(value, Rule):
        return value
    if isinstance(value, str):
        value = parse_flag(value)
    if not isinstance(value, dict) or "match" not in value:
        raise LlmqError(f"a rule needs 'match' (a regex over module names), got {value!r}")
    unknown = set(value) - set(KEYS)
    if unknown:
        raise LlmqError(f"unknown rule key {sorted(unknown)[0]!r}; rules take {', '.join(KEYS)}")
    types = {"match": str, "bits": int, "group_size": int, "sym": bool, "type": str, "keep": bool}
    for k, v in value.items():
        if v is not None and not (isinstance(v, types[k]) and not (types[k] is int and isinstance(v, bool))):
            raise LlmqError(f"rule {value['match']!r}: {k} must be {types[k].__name__}, got {v!r}")
    return Rule(**{k: (v.upper() if k == "type" and v else v) for k, v in value.items()})


def parse_flag(text: str) -> dict[str, Any]:
    """``REGEX=bits:8,group_size:64`` / ``REGEX=type:<gguf type>`` / ``REGEX=keep`` -> a rule mapping."""
    pattern, sep, spec = text.rpartition("=")
    if not sep or not pattern or not spec:
        raise LlmqError(f"--rule {text!r}: write REGEX=key:value[,key:value] or REGEX=keep")
    rule: dict[str, Any] = {"match": pattern}
    for item in spec.split(","):
        key, _, v = item.strip().partition(":")
        key = key.replace("-", "_")
        if key == "keep" and not v:
            rule["keep"] = True
        elif key in ("bits", "group_size"):
            try:
                rule[key] = int(v)
            except ValueError:
                raise LlmqError(f"--rule {text!r}: {key} must be an integer, got {v!r}") from None
        elif key in ("sym", "keep"):
            if v.lower() not in ("true", "false"):
                raise LlmqError(f"--rule {text!r}: {key} must be true or false, got {v!r}")
            rule[key] = v.lower() == "true"
        elif key == "type":
            rule[key] = v
        else:
            raise LlmqError(f"--rule {text!r}: unknown key {key!r}; rules take {', '.join(KEYS[1:])}")
    return rule
