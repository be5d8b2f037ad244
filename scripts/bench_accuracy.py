#!/usr/bin/env python
"""Accuracy side by side: llmq's recipes and the peers' on the same model and calibration token ids.

Every run happens in a fresh process (the peers in their own virtualenvs: --peer TOOL=PYTHON) on the
same calibration ids, and every output is read back by `llmq eval` against the source model on the
same text (mean KL, top-1 agreement, perplexity), so all tools' files are measured by one code path.
Unquantized tensors keep the source's dtype in every tool: only the method differs.

Recipes, each at every --settings entry (bits and group size; symmetric grids throughout):
  llmq gptq      GPTQ, act-order with static groups, grid search (llmq's defaults)
  llmq gptq-mm   the same with min/max grids (--no-grid-search): the peers' GPTQ
  llmq fast      configs/fast-*: GPTQ fitted to the unquantized model's outputs (fp_targets 1), scale refit
  llmq best      configs/best-*: fast, then the scales tuned end to end (tune_steps)
  llmq learned   configs/learned-*: signround (learned rounding and scales from RTN), then the scales tuned end to end
  (fast/best/learned take the recipe of their bit width, W2 g64's at 2 bits, at the setting's group size)
  llmcompressor  GPTQModifier, static act-order, damp 0.01
  gptqmodel      GPTQ, desc_act with static groups, damp 0.01
  autoround      AutoRound's default recipe (200 steps of SignRound), saved as auto_gptq

A peer may leave some decoder linears in float (AutoRound does where a side is no multiple of 32): then
--layout-recipes (default best,learned) run again with those linears skipped: rows "RECIPE, PEER's layout",
whose ratio is to that peer's KL (the same linears quantized, about the same bytes).

    python scripts/bench_accuracy.py --model ../shared/assets/models/llmq-ref-6m --seqlen 256 \\
        --calib-dataset ../shared/assets/datasets/c4-sample/c4_sample_200docs.jsonl \\
        --eval-dataset ../shared/assets/datasets/wikitext-2-raw-v1/test-00000-of-00001.parquet \\
        --settings w4g128,w3g128,w2g64 --peer autoround=../peers/autoround/bin/python --out eval/results/NAME
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).parent))
from bench_quantize import calibration_ids, child_env, evaluate  # noqa: E402  (the same ids, env and eval as the speed bench)
from llmq.safetensors_stream import Header  # noqa: E402

CHILD = r"""
import json, sys, time, torch
from importlib.metadata import version
tool, recipe, src, out, ids_path, bits, gs, recipe_file, skip = sys.argv[1:10]
bits, gs, skip = int(bits), int(gs), json.loads(skip)
ids = torch.load(ids_path)
nsamples, seqlen = ids.shape
from transformers import AutoConfig
dtype = str(getattr(AutoConfig.from_pretrained(src), "dtype", None) or "float32").removeprefix("torch.")
t0 = time.perf_counter()
if tool == "llmq":
    from llmq.recipe import build_config, load_recipe
    from llmq.pipeline import quantize_model
    from llmq.source import ModelSource
    from llmq.tune import quantize_then_tune
    opts = {"bits": bits, "group_size": gs, "nsamples": nsamples, "seqlen": seqlen, "dtype": dtype, "format": "gptq"}
    if recipe_file == "-":
        opts.update(method="gptq", act_order=True, grid_search=recipe != "gptq-mm")
    cfg = build_config(load_recipe(recipe_file) if recipe_file != "-" else {}, opts)
    cfg.skip = [*cfg.skip, *skip]  # (a peer's layout: these linears stay in float too, as the peer left them)
    (quantize_then_tune if cfg.tune_steps else quantize_model)(ModelSource(src), cfg, out, progress=False, calib_ids=ids)
elif tool == "llmcompressor":
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=gs)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], dampening_frac=0.01, actorder="static")
    oneshot(model=src, dataset=ds, recipe=recipe, max_seq_length=seqlen, num_calibration_samples=nsamples, output_dir=out)
elif tool == "gptqmodel":
    from gptqmodel import GPTQModel, QuantizeConfig
    qcfg = QuantizeConfig(bits=bits, group_size=gs, sym=True, desc_act=True, static_groups=True,
                          act_group_aware=False, damp_percent=0.01)
    model = GPTQModel.load(src, qcfg)
    model.quantize([{"input_ids": r.tolist(), "attention_mask": [1] * seqlen} for r in ids])
    model.save(out)
elif tool == "autoround":
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(src)
    data = [r[None] for r in ids]  # the calibration ids, one window per item (AutoRound batches them itself)
    ar = AutoRound(model, tok, bits=bits, group_size=gs, sym=True, dataset=data, nsamples=nsamples, seqlen=seqlen)
    ar.quantize_and_save(out, format="auto_gptq")
    import glob, os, shutil
    if not os.path.exists(os.path.join(out, "config.json")):  # (it may save into a folder of its own naming below out)
        sub = os.path.dirname(sorted(glob.glob(os.path.join(out, "**", "config.json"), recursive=True))[0])
        for f in os.listdir(sub):
            shutil.move(os.path.join(sub, f), os.path.join(out, f))
seconds = time.perf_counter() - t0
versions = {p: version(p) for p in ("torch", "transformers", {"autoround": "auto-round"}.get(tool, tool))}
print(json.dumps({"seconds": seconds, "versions": versions}))
"""

PEERS = ("llmcompressor", "gptqmodel", "autoround")
LLMQ_RECIPES = ("gptq", "gptq-mm", "fast", "best", "learned")
DEFAULT_RECIPES = LLMQ_RECIPES
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def recipe_file(recipe: str, bits: int) -> str:
    """The configs/ file an llmq recipe runs ('-': none, the recipe is built here)."""
    if recipe not in ("fast", "best", "learned"):
        return "-"
    return str(CONFIGS / f"{recipe}-w{bits}g{64 if bits == 2 else 128}.yaml")


def settings(text: str) -> list[tuple[int, int]]:
    """'w4g128,w3g128' -> [(4, 128), (3, 128)]."""
    out = []
    for s in text.split(","):
        bits, _, gs = s.strip().lower().removeprefix("w").partition("g")
        if not (bits.isdigit() and gs.isdigit()):
            sys.exit(f"bench_accuracy: cannot read setting {s!r} (e.g. w4g128)")
        out.append((int(bits), int(gs)))
    return out


def run(tool: str, recipe: str, python: str, src: str, out: Path, ids: Path, bits: int, gs: int,
        skip: Sequence[str] = ()) -> dict | None:
    p = subprocess.run([python, "-c", CHILD, tool, recipe, src, str(out), str(ids), str(bits), str(gs),
                        recipe_file(recipe, bits) if tool == "llmq" else "-", json.dumps(list(skip))],
                       capture_output=True, text=True, env=child_env(tool))
    if p.returncode != 0:
        print(f"{tool} {recipe} W{bits} g{gs}: failed\n{p.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def float_linears(src: str | Path, out: Path) -> list[str]:
    """The decoder layers' linears (2-D weights under a ``.layers.`` module) the source stores and ``out``
    keeps in float: a ``.weight`` there and no ``.qweight``."""
    def tensors(folder: Path) -> dict[str, int]:  # name -> number of dimensions, from the files' headers
        entries = [Header(f).entries for f in sorted(Path(folder).rglob("*.safetensors"))]
        return {k: len(e["shape"]) for es in entries for k, e in es.items() if k != "__metadata__"}

    source, written = tensors(Path(src)), tensors(out)
    linears = [k.removesuffix(".weight") for k, dims in source.items()
               if k.endswith(".weight") and dims == 2 and ".layers." in k]
    return sorted(m for m in linears if f"{m}.weight" in written and f"{m}.qweight" not in written)


def table(rows: list[dict]) -> list[str]:
    lines = ["| setting | tool | recipe | weight files MiB | mean KL | top-1 | perplexity | seconds | KL / best peer's |",
             "|---|---|---|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        peer_kl = [r["kld"] for r in mine if r["tool"] != "llmq" and r.get("kld") is not None]
        best = min(peer_kl) if peer_kl else None
        for r in mine:
            if r.get("kld") is None:
                lines.append(f"| {setting} | {r['tool']} | {r['recipe']} | | failed | | | | |")
                continue
            # (at a peer's layout: to that peer's KL, the one model of the same bytes)
            ref = next((p["kld"] for p in mine if p["tool"] == r.get("layout_of")), best)
            ratio = f"{r['kld'] / ref:.2f}×" if ref else ""
            lines.append(f"| {setting} | {r['tool']} | {r['recipe']} | {r['weights_mib']:.3f} | {r['kld']:.5f} | {100 * r['top1']:.2f}% | "
                         f"{r['ppl']:.4f} | {r['seconds']:.1f} | {ratio} |")
    return lines


def layout_note(rows: list[dict]) -> list[str]:
    """What the rows at a peer's layout are, where there are any."""
    kept = {(r["layout_of"], r["float_linears"]) for r in rows if r.get("layout_of")}
    if not kept:
        return []
    said = ", ".join(f"{peer} {n}" for peer, n in sorted(kept))
    return [f"\"RECIPE, PEER's layout\": llmq keeping in float the decoder linears that peer kept in float "
            f"({said}); the ratio is to that peer's KL.", ""]


def bench_setting(bits: int, gs: int, recipes: list[str], layout_recipes: list[str], peers: dict[str, str],
                  tmp: Path, ids: Path, args: argparse.Namespace) -> tuple[list[dict], dict[str, dict]]:
    """Every recipe and peer at one setting, then llmq's layout recipes at each peer's layout where it kept
    decoder linears in float: the rows, and each tool's versions."""
    rows, versions = [], {}
    runs = [("llmq", r, sys.executable, None) for r in recipes] + [(t, "default", py, None) for t, py in peers.items()]
    kept_by: dict[str, list[str]] = {}  # peer -> the decoder linears its output keeps in float
    for tool, recipe, python, peer in runs:  # (a peer's layout runs are appended once that peer has run)
        out = tmp / f"{tool}-{recipe}-w{bits}g{gs}{f'-as-{peer}' if peer else ''}"
        r = run(tool, recipe, python, args.model, out, ids, bits, gs, kept_by.get(peer, []))
        e = evaluate(out, args.model, args) if r is not None else None
        row = {"setting": f"W{bits} g{gs}", "tool": tool, "recipe": f"{recipe}, {peer}'s layout" if peer else recipe,
               "seconds": None if r is None else r["seconds"],
               "weights_mib": sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**20 if r else None}
        if peer:
            row.update(layout_of=peer, float_linears=len(kept_by[peer]))
        if e is not None:
            row.update(kld=e["kld"], top1=e["top1"], ppl=e["ppl"], reference_ppl=e.get("reference_ppl"))
        rows.append(row)
        if r is not None:
            versions[tool] = r["versions"]
        print(json.dumps(row), flush=True)
        if tool != "llmq" and r is not None:
            kept_by[tool] = float_linears(args.model, out)
            if kept_by[tool]:
                runs += [("llmq", x, sys.executable, tool) for x in layout_recipes]
    return rows, versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local model directory")
    ap.add_argument("--calib-dataset", required=True, help="calibration text (llmq dataset spec)")
    ap.add_argument("--eval-dataset", required=True, help="text every output is evaluated on against the source model")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=100, help="evaluate the first N windows (0: all)")
    ap.add_argument("--settings", default="w4g128,w3g128,w2g64", help="comma-separated wBITSgSIZE")
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help=f"llmq recipes, of {', '.join(LLMQ_RECIPES)} "
                                                                      f"(default {','.join(DEFAULT_RECIPES)})")
    ap.add_argument("--layout-recipes", default="best,learned",
                    help="llmq recipes run again at each peer's layout, where it left decoder linears in float "
                         "('': none)")
    ap.add_argument("--peer", action="append", default=[], metavar="TOOL=PYTHON",
                    help=f"run TOOL ({', '.join(PEERS)}) with this Python (its own virtualenv)")
    ap.add_argument("--out", required=True, help="write OUT.md and OUT.json")
    args = ap.parse_args()
    import torch

    peers = dict(p.split("=", 1) for p in args.peer)
    if set(peers) - set(PEERS):
        sys.exit(f"bench_accuracy: unknown peer {sorted(set(peers) - set(PEERS))[0]!r} (known: {', '.join(PEERS)})")
    recipes = args.recipes.split(",")
    layout_recipes = [r for r in args.layout_recipes.split(",") if r]
    if set(recipes + layout_recipes) - set(LLMQ_RECIPES):
        sys.exit(f"bench_accuracy: unknown recipe {sorted(set(recipes + layout_recipes) - set(LLMQ_RECIPES))[0]!r}")
    rows, versions = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "ids.pt"
        torch.save(calibration_ids(args.model, args), ids)
        for bits, gs in settings(args.settings):
            more, seen = bench_setting(bits, gs, recipes, layout_recipes, peers, Path(tmp), ids, args)
            rows += more
            versions.update(seen)
    command = "python scripts/bench_accuracy.py " + shlex.join(sys.argv[1:])
    lines = [f"# Accuracy side by side: {Path(args.model).name}", "", f"Command: `{command}`", "",
             f"Calibration: `{args.calib_dataset}`, {args.nsamples} × {args.seqlen} token ids, the same for every tool. "
             f"Eval: `{args.eval_dataset}`, seqlen {args.seqlen}, "
             f"{'all' if not args.max_windows else f'the first {args.max_windows}'} windows, every output read back by "
             "`llmq eval` against the source model. Seconds: the quantization alone, one process at a time.", "",
             *table(rows), "", *layout_note(rows),
             "Versions: " + "; ".join(f"{t}: " + ", ".join(f"{k} {v}" for k, v in vs.items()) for t, vs in versions.items())]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "versions": versions},
                                                              indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
