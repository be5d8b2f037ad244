"""Recipes load, and command-line flags override them."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from llmq.config import build_config, load_recipe, parse_size
from llmq.errors import LlmqError


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe: Path):
    cfg = build_config(load_recipe(recipe), {})
    assert cfg.method in ("gptq", "rtn", "awq", "awq+gptq")
    name = recipe.stem
    assert f"w{cfg.bits}" in name  # the file name says what the recipe does
    if "g128" in name:
        assert cfg.group_size == 128
    if "perchannel" in name:
        assert cfg.group_size == -1


def test_flags_override_recipe():
    cfg = build_config(load_recipe(ROOT / "configs" / "gptq-w4g128.yaml"), {"bits": 3, "nsamples": 16, "group_size": None})
    assert cfg.bits == 3 and cfg.calibration.nsamples == 16 and cfg.group_size == 128


def test_unknown_keys_and_bad_values_are_errors():
    with pytest.raises(LlmqError, match="unknown recipe key"):
        build_config({"bitz": 4}, {})
    with pytest.raises(LlmqError, match="bits"):
        build_config({}, {"bits": 6})
    with pytest.raises(LlmqError, match="group-size"):
        build_config({}, {"group_size": 0})


def test_parse_size():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("100") == 100
    with pytest.raises(LlmqError):
        parse_size("lots")


def test_act_order_default_is_per_method_and_overridable():
    assert build_config({"method": "gptq"}, {}).act_order is True
    assert build_config({"method": "rtn"}, {}).act_order is False
    assert build_config({"method": "awq+gptq"}, {}).act_order is False
    assert build_config({"method": "gptq"}, {"act_order": False}).act_order is False
    assert build_config(load_recipe(ROOT / "configs" / "gptq-w8.yaml"), {}).act_order is False  # the recipe's own choice
    assert build_config(load_recipe(ROOT / "configs" / "gptq-w8.yaml"), {"act_order": True}).act_order is True


def test_cli_act_order_flags():
    from llmq.cli import build_parser

    p = build_parser()
    base = ["quantize", "--model", "m", "--out", "o"]
    assert p.parse_args(base).act_order is None
    assert p.parse_args([*base, "--no-act-order"]).act_order is False
    assert p.parse_args([*base, "--act-order"]).act_order is True
    with pytest.raises(SystemExit):
        p.parse_args([*base, "--act-order", "--no-act-order"])
