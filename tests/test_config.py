"""Recipes load, and command-line flags override them."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from llmq.config import parse_size
from llmq.recipe import build_config, load_recipe
from llmq.errors import LlmqError
from llmq.methods import options_for


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe: Path):
    cfg = build_config(load_recipe(recipe), {})
    assert cfg.method in ("gptq", "rtn", "awq", "awq+gptq", "signround")
    name = recipe.stem  # the file name says what the recipe does
    if cfg.format == "gguf":
        assert name.endswith(cfg.gguf_type.lower())
    else:
        assert f"w{cfg.bits}" in name
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


def _options(recipe, overrides):
    cfg = build_config(recipe, overrides)
    return options_for(cfg.method, cfg.options)


def test_act_order_default_is_per_method_and_overridable():
    assert _options({"method": "gptq"}, {}).act_order is True
    assert _options({"method": "awq+gptq"}, {}).act_order is False
    assert _options({"method": "gptq"}, {"act_order": False}).act_order is False
    assert _options(load_recipe(ROOT / "configs" / "gptq-w8.yaml"), {}).act_order is False  # the recipe's own choice
    assert _options(load_recipe(ROOT / "configs" / "gptq-w8.yaml"), {"act_order": True}).act_order is True


def test_method_options_belong_to_their_method():
    """A method's own keys are checked against it: RTN takes none, AWQ no GPTQ damping; bad values are refused."""
    with pytest.raises(LlmqError, match="rtn does not take act_order"):
        build_config({"method": "rtn"}, {"act_order": True})
    with pytest.raises(LlmqError, match="awq does not take damp"):
        build_config({"method": "awq", "damp": 0.1}, {})
    with pytest.raises(LlmqError, match="block-size"):
        build_config({"method": "gptq"}, {"block_size": 0})
    with pytest.raises(LlmqError, match="damp must be a number"):
        build_config({"method": "gptq", "damp": "lots"}, {})
    assert _options({"method": "awq+gptq"}, {"awq_clip": True}).awq_clip is True  # the flag reaches AWQ+GPTQ (defect 7)
    assert _options({"method": "awq"}, {}).awq_clip is True and _options({"method": "awq+gptq"}, {}).awq_clip is False


def test_cli_act_order_flags():
    from llmq.cli import build_parser

    p = build_parser()
    base = ["quantize", "--model", "m", "--out", "o"]
    assert p.parse_args(base).act_order is None
    assert p.parse_args([*base, "--no-act-order"]).act_order is False
    assert p.parse_args([*base, "--act-order"]).act_order is True
    with pytest.raises(SystemExit):
        p.parse_args([*base, "--act-order", "--no-act-order"])
    assert p.parse_args([*base, "--awq-clip"]).awq_clip is True and p.parse_args([*base, "--no-awq-clip"]).awq_clip is False


def test_gguf_types_need_the_gguf_format():
    """A GGUF block type with a safetensors layout would write codes (5-bit, K-quant minimums) no runtime reads."""
    for fmt in ("gptq_v2", "gptq", "compressed-tensors", None):
        with pytest.raises(LlmqError, match="only with --format gguf"):
            build_config({}, {"format": fmt, "gguf_type": "Q5_0"})


def test_model_name_of_a_hub_source_is_the_repo_name(tmp_path, monkeypatch):
    """A hub model's files sit in a snapshot directory named by a hash; outputs name the model."""
    import shutil

    from conftest import STORIES, need
    from llmq import source

    snapshot = tmp_path / "snapshots" / "0123456789abcdef"
    shutil.copytree(need(STORIES), snapshot)
    monkeypatch.setattr(source, "resolve_model_dir", lambda model, revision=None, allow_patterns=None: snapshot)
    assert source.ModelSource("karpathy/stories260K").display_name == "stories260K"
    assert source.ModelSource(str(snapshot) + "/").display_name == "0123456789abcdef"  # a local directory: its name


def test_grid_search_is_a_switch_of_integer_grids():
    from llmq.plan import recipe_grid
    from llmq.recipe import rule_grid
    from llmq.rules import parse_rules

    cfg = build_config({}, {})
    assert recipe_grid(cfg).search  # on unless turned off
    rule = parse_rules([{"match": "down_proj", "bits": 8}])[0]
    assert rule_grid(rule, recipe_grid(cfg)).search and rule_grid(rule, recipe_grid(cfg)).bits == 8  # rules keep it
    assert not recipe_grid(build_config({"grid_search": False}, {})).search
    assert not recipe_grid(build_config({"method": "awq"}, {})).search  # AWQ clips its own way
    assert recipe_grid(build_config({"method": "awq", "grid_search": True}, {})).search
    assert build_config({}, {"format": "gguf", "gguf_type": "Q4_K_M"}).gguf_type == "Q4_K_M"  # (the default asks nothing of it)
    with pytest.raises(LlmqError, match="true or false"):
        build_config({"grid_search": "yes"}, {})
    for fmt, extra in (("gguf", {"gguf_type": "Q4_K_M"}), ("bitsandbytes", {})):
        with pytest.raises(LlmqError, match="integer grids"):
            build_config({}, {"format": fmt, "grid_search": True, **extra})


def test_refit_scales_is_a_gptq_switch_of_integer_grids():
    from llmq.methods import options_for

    assert options_for("gptq", build_config({"method": "gptq", "refit_scales": True}, {}).options).refit_scales
    assert not options_for("gptq", {}).refit_scales  # off unless asked
    with pytest.raises(LlmqError, match="true or false"):
        options_for("gptq", build_config({"method": "gptq", "refit_scales": 1}, {}).options)
    with pytest.raises(LlmqError, match="signround learns"):
        options_for("signround", {"refit_scales": True})
    with pytest.raises(LlmqError, match="momentum must be in"):
        options_for("signround", {"momentum": 1.0})
    with pytest.raises(LlmqError, match="does not take refit_scales"):
        options_for("awq", {"refit_scales": True})
    for fmt, extra in (("gguf", {"gguf_type": "Q4_K_M"}), ("bitsandbytes", {})):
        with pytest.raises(LlmqError, match="integer grids"):
            build_config({"method": "gptq", "refit_scales": True}, {"format": fmt, **extra})
