"""The size/accuracy report: quantize a model several ways, measure each, project to 7B.

Every variant is quantized in its own process (for honest time and peak-memory numbers),
evaluated against the FP32 model, and recorded as JSON before the next one starts, so an
interrupted report resumes from the finished variants.  Tables and the plot are made only
from those records.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open

import llmq
from llmq.arch import decoder_linears
from llmq.checkpoint import load_for_eval, load_model
from llmq.data import eval_tokens
from llmq.errors import LlmqError
from llmq.eval import ReferenceLogProbs, evaluate
from llmq.gguf import reader as gguf_reader
from llmq.gguf.model import GGUF_ARCHS
from llmq.gguf.types import BLOCK_TYPES, MIXES
from llmq.methods import METHODS, options_for
from llmq.plan import recipe_grid
from llmq.plot import size_vs_ppl
from llmq.projection import meta_model, parameter_count, project
from llmq.recipe import build_config
from llmq.safetensors_stream import DTYPE_BYTES
from llmq.source import ModelSource

RECORD = "record.json"
EVAL_BATCH = 8  # windows per forward pass

# Published Llama-2-7B wikitext-2 perplexities at seqlen 2048 (AWQ paper, Table 4; GPTQ/RTN columns as reported there).
PUBLISHED_7B = {("fp16", None, None): 5.47,
                ("rtn", 4, 128): 5.73, ("gptq", 4, 128): 5.69, ("awq", 4, 128): 5.60,
                ("rtn", 3, 128): 6.66, ("gptq", 3, 128): 6.43, ("awq", 3, 128): 6.24}


@dataclass
class Variant:
    name: str
    recipe: dict[str, Any]

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@dataclass
class Suite:
    name: str
    variants: list[Variant]
    eval: list[str]
    calibration: dict[str, Any] = field(default_factory=dict)
    projection: str | None = None


def load_suite(path: str | Path) -> Suite:
    p = Path(path)
    if not p.is_file():
        raise LlmqError(f"suite {str(p)!r} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    try:
        variants = [Variant(v.pop("name"), v) for v in data["variants"]]
    except (KeyError, TypeError, AttributeError):
        raise LlmqError(f"suite {str(p)!r} needs a 'variants' list whose entries have a 'name'") from None
    for v in variants:
        build_config(v.recipe, {})  # fail now, not after hours of work
    return Suite(name=data.get("name", p.stem), variants=variants, eval=list(data.get("eval", ["wikitext2"])),
                 calibration=dict(data.get("calibration") or {}), projection=data.get("projection"))


def _tensor_bytes(ckpt: Path) -> dict[str, int]:
    sizes = {}
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                t = st.get_slice(k)
                n = math.prod(t.get_shape())
                sizes[k] = n * DTYPE_BYTES[t.get_dtype()]
    return sizes


def _measure_sizes(ckpt: Path, model_params: int, linear_shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """File bytes, and bits per weight over the whole model and over the decoder linears."""
    tensors = _tensor_bytes(ckpt)
    file_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    lin_bytes = sum(b for k, b in tensors.items() if _owner(k, linear_shapes))
    lin_weights = sum(o * i for o, i in linear_shapes.values())
    return {"file_bytes": file_bytes, "tensor_bytes": sum(tensors.values()),
            "bits_per_weight": 8 * sum(tensors.values()) / model_params,
            "bits_per_linear_weight": 8 * lin_bytes / lin_weights}


def _owner(key: str, linears: dict[str, Any]) -> str | None:
    """The linear a stored tensor belongs to ("...q_proj" for "...q_proj.qweight" or "...q_proj.weight.absmax")."""
    parts = key.split(".")
    return next((p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if p in linears), None)


@dataclass
class _Context:
    """What every variant of a report is measured against, prepared once per run."""

    model: str
    source: ModelSource
    seqlen: int
    datasets: dict[str, str]
    tokens: dict[str, Any]
    references: dict[str, ReferenceLogProbs]  # the FP32 model's log-probabilities, computed once per dataset
    linear_shapes: dict[str, tuple[int, int]]  # checkpoint name of each decoder linear -> (out, in)
    n_params: int
    projection: Any


def _prepare(model: str, suite: Suite, out: Path, eval_paths: dict[str, str], seqlen: int | None,
             max_windows: int | None, progress: bool) -> _Context:
    reference, source = load_model(model)
    context = getattr(source.config, "max_position_embeddings", None)
    seqlen = seqlen or min(2048, context or 2048)
    if context is not None and seqlen > context:
        raise LlmqError(f"--seqlen {seqlen} exceeds the model's context length {context}")
    tokenizer = source.tokenizer()
    datasets = {name: eval_paths.get(name, name) for name in suite.eval}
    tokens = {name: eval_tokens(tokenizer, spec) for name, spec in datasets.items()}
    if max_windows:
        tokens = {k: v[: max_windows * seqlen] for k, v in tokens.items()}
    references = {name: ReferenceLogProbs(reference, toks, seqlen, out / ".reference" / f"{name}.npy", batch_size=EVAL_BATCH,
                                          progress=progress) for name, toks in tokens.items()}
    # keyed by checkpoint names, as the files store them
    linear_shapes = {source.module_key(name): tuple(lin.weight.shape) for name, lin in decoder_linears(reference).items()}
    return _Context(model, source, seqlen, datasets, tokens, references, linear_shapes, parameter_count(reference),
                    meta_model(suite.projection) if suite.projection else None)


def run_report(model: str, suite: Suite, out: str | Path, *, eval_paths: dict[str, str], seqlen: int | None,
               calib_dataset: str | None = None, nsamples: int | None = None, max_windows: int | None = None,
               progress: bool = True, command: str = "") -> list[dict[str, Any]]:
    out = Path(out)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    ctx = _prepare(model, suite, out, eval_paths, seqlen, max_windows, progress)
    calib = {**suite.calibration, **({"dataset": calib_dataset} if calib_dataset else {}),
             **({"nsamples": nsamples} if nsamples else {}), "seqlen": ctx.seqlen}
    # A record is reused only if it was measured under the same settings: rows must share their windows.
    # The tool version is part of the key: a record measured by other code is measured again.
    run_key = {"model": model, "seqlen": ctx.seqlen, "eval": ctx.datasets, "max_windows": max_windows, "calibration": calib,
               "llmq": llmq.__version__}
    records = []
    try:
        for v in suite.variants:
            rec = _reuse(v, out, run_key, calib)
            if rec is None:
                rec = _measure(v, ctx, out, run_key, calib, progress, command)
            if rec is not None:
                records.append(rec)
    finally:
        shutil.rmtree(out / ".reference", ignore_errors=True)
    write_outputs(records, suite, out, model, command)
    return records


def _reuse(v: Variant, out: Path, run_key: dict, calib: dict) -> dict | None:
    rec_file = out / "variants" / v.slug / RECORD
    if not rec_file.is_file():
        return None
    old = json.loads(rec_file.read_text())
    if old.get("run_key") == run_key and old.get("recipe") == _recipe_dict({**v.recipe, "calibration": calib}):
        print(f"[{v.name}] finished earlier: reusing {rec_file}", flush=True)
        return old
    print(f"[{v.name}] recorded under other settings: measuring again", flush=True)
    return None


def _recipe_dict(recipe: dict[str, Any]) -> dict[str, Any]:
    """A variant's recipe with every default filled in, as records keep it."""
    cfg = build_config(recipe, {})
    return {**cfg.to_dict(), "options": dataclasses.asdict(options_for(cfg.method, cfg.options))}


def _measure(v: Variant, ctx: _Context, out: Path, run_key: dict, calib: dict, progress: bool, command: str) -> dict | None:
    """Quantize one variant in its own process, evaluate it against the FP32 model, and record it."""
    recipe = {**v.recipe, "calibration": calib}
    cfg = build_config(recipe, {})
    is_gguf = cfg.format == "gguf"
    if is_gguf and getattr(ctx.source.config, "model_type", None) not in GGUF_ARCHS:
        print(f"[{v.name}] skipped: GGUF export supports {', '.join(GGUF_ARCHS)} models", flush=True)
        return None
    vdir = out / "variants" / v.slug
    vdir.mkdir(parents=True, exist_ok=True)
    (vdir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    ckpt = vdir / "checkpoint" / "model.gguf" if is_gguf else vdir / "checkpoint"
    cmd = [sys.executable, "-m", "llmq", "quantize", "--config", str(vdir / "recipe.yaml"), "--model", ctx.model,
           "--out", str(ckpt), "--overwrite", "--stats-json", str(vdir / "quantize_stats.json")]
    if not progress:
        cmd.append("--quiet")
    print(f"[{v.name}] quantize: {shlex.join(cmd)}", flush=True)
    p = subprocess.run(cmd, stderr=None if progress else subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise LlmqError(f"variant {v.name!r} failed to quantize: {(p.stderr or '').strip().splitlines()[-1:] or 'see above'}")
    qstats = json.loads((vdir / "quantize_stats.json").read_text())
    qmodel, _, _ = load_for_eval(str(ckpt))
    evals = {name: {"dataset": ctx.datasets[name], **evaluate(qmodel, toks, ctx.seqlen, reference=ctx.references[name],
                                                              progress=progress, batch_size=EVAL_BATCH).to_dict()}
             for name, toks in ctx.tokens.items()}
    del qmodel
    quantizes = METHODS[cfg.method].quantizes
    grid_bits, grid_group = _bits_and_group(cfg) if quantizes else (None, None)
    lin_weights = sum(o * i for o, i in ctx.linear_shapes.values())
    rec = {"variant": v.name, "slug": v.slug, "run_key": run_key, "recipe": _recipe_dict(recipe), "method": cfg.method,
           "bits": grid_bits, "group_size": grid_group, "format": cfg.gguf_type.upper() if is_gguf else cfg.format_name(),
           **(gguf_reader.measure(ckpt, ctx.n_params, lin_weights) if is_gguf
              else _measure_sizes(ckpt, ctx.n_params, ctx.linear_shapes)),
           "quantize_seconds": qstats["seconds"], "quantize_peak_rss_mib": qstats["peak_rss_mib"], "eval": evals,
           "seqlen": ctx.seqlen, "projection": project(ctx.projection, cfg) if ctx.projection is not None else None,
           "published_7b_ppl": PUBLISHED_7B.get(_anchor_key(cfg)), "checkpoint": str(ckpt), "command": command}
    rec_file = vdir / RECORD
    tmp = rec_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=2) + "\n")
    os.replace(tmp, rec_file)  # the record appears whole or not at all
    print(f"[{v.name}] " + "  ".join(f"{k}: ppl {e['ppl']:.4f} KL {e['kld']:.5f}" for k, e in evals.items()), flush=True)
    return rec


def _bits_and_group(cfg) -> tuple[int, int]:
    """The recipe's code width and group size; a GGUF file's are those of its base type."""
    if cfg.format == "gguf":
        t = BLOCK_TYPES.get(MIXES.get(cfg.gguf_type.upper(), cfg.gguf_type.upper()))
        return (t.bits, t.group_size) if t else (None, None)
    grid = recipe_grid(cfg)
    return grid.bits, grid.group_size


def _anchor_key(cfg) -> tuple | None:
    """Which published Llama-2-7B number describes this recipe (safetensors INT recipes and FP only)."""
    if not METHODS[cfg.method].quantizes:
        return ("fp16", None, None)
    if cfg.format in ("gguf", "bitsandbytes"):
        return None
    return (cfg.method, cfg.bits, cfg.group_size)


# ---- outputs -------------------------------------------------------------------------

def _fp32(records: list[dict]) -> dict | None:
    return next((r for r in records if r["method"] == "fp32"), None)


def write_outputs(records: list[dict], suite: Suite, out: Path, model: str, command: str) -> None:
    if not records:
        return
    base = _fp32(records) or records[0]
    first = suite.eval[0]
    rows = []
    for r in records:
        row = {"variant": r["variant"], "method": r["method"], "bits": r["bits"], "group": r["group_size"],
               "file_bytes": r["file_bytes"], "bits_per_weight": round(r["bits_per_weight"], 4),
               "bits_per_linear_weight": round(r["bits_per_linear_weight"], 4),
               "reduction_vs_fp32": 1 - r["file_bytes"] / base["file_bytes"]}
        for name, e in r["eval"].items():
            fp = base["eval"][name]["ppl"]
            row.update({f"ppl_{name}": e["ppl"], f"dppl_{name}": e["ppl"] - fp, f"kld_{name}": e["kld"],
                        f"top1_{name}": e["top1"], f"accuracy_{name}": fp / e["ppl"]})
        row.update({"quantize_seconds": r["quantize_seconds"], "peak_rss_mib": r["quantize_peak_rss_mib"]})
        if r.get("projection"):
            row["projected_7b_bytes"] = r["projection"]["total_bytes"]
        row["published_7b_ppl"] = r.get("published_7b_ppl")
        rows.append(row)
    (out / "report.json").write_text(json.dumps({"model": model, "suite": suite.name, "command": command,
                                                 "records": records, "rows": rows}, indent=2) + "\n")
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    (out / "report.md").write_text(render_markdown(rows, records, suite, model, command))
    size_vs_ppl(rows, first, out / "size_vs_ppl.png", title=f"{Path(model).name}: perplexity ({first}) vs size")


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def render_markdown(rows: list[dict], records: list[dict], suite: Suite, model: str, command: str) -> str:
    first = suite.eval[0]
    seqlen = records[0]["seqlen"]
    lines = [f"# Size / accuracy report: `{model}`", "", f"Command: `{command}`", "",
             f"Suite `{suite.name}`; evaluation seqlen {seqlen}; every number below comes from "
             "`variants/<name>/record.json` (written by the run that measured it).", "",
             "**Accuracy** = ppl(FP32) / ppl(variant) on the same windows: 100% means the FP32 model's predictive "
             "quality is kept; it can exceed 100% by noise. **KL** is the mean KL(FP32 ‖ variant) per token (nats), "
             "**top-1** the fraction of tokens where both models' most likely next token agree. **bpw** counts every "
             "stored byte (scales, zeros, g_idx, unquantized embeddings) over all parameters; **bpw (linears)** only "
             "the quantized decoder linears.", "", "## Measured on this model", ""]
    evals = list(records[0]["eval"])
    head = ["variant", "method", "bits", "group", "file size", "reduction", "bpw", "bpw (linears)"]
    for e in evals:
        head += [f"ppl {e}", f"Δppl {e}", f"KL {e}", f"top-1 {e}", f"accuracy {e}"]
    head += ["quantize s", "peak RSS MiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], r["method"], "" if r["bits"] is None else str(r["bits"]),
                 "" if r["group"] is None else ("channel" if r["group"] == -1 else str(r["group"])), f"{r['file_bytes'] / 2**20:.2f} MiB", f"{100 * r['reduction_vs_fp32']:.1f}%",
                 f"{r['bits_per_weight']:.2f}", f"{r['bits_per_linear_weight']:.2f}"]
        for e in evals:
            cells += [f"{r[f'ppl_{e}']:.4f}", f"{r[f'dppl_{e}']:+.4f}", f"{r[f'kld_{e}']:.5f}", f"{100 * r[f'top1_{e}']:.2f}%",
                      f"{100 * r[f'accuracy_{e}']:.2f}%"]
        cells += [f"{r['quantize_seconds']:.1f}", f"{r['peak_rss_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("projected_7b_bytes") for r in rows):
        fp = next((r["projected_7b_bytes"] for r in rows if r["method"] == "fp32"), rows[0]["projected_7b_bytes"])
        lines += ["", f"## The same recipes on Llama-2-7B ({suite.projection})", "",
                  "Size: exact tensor bytes of each recipe applied to the Llama-2-7B architecture (6,738,415,616 parameters), "
                  "computed tensor by tensor (safetensors headers, a few KB, not counted). Accuracy: measured above on "
                  f"*this* model ({first}), not on Llama-2-7B. The last column holds **published** Llama-2-7B wikitext-2 "
                  "perplexities (seqlen 2048, AWQ paper) for reference; llmq did not measure them.", "",
                  "| Precision | Size (7B) | Reduction | Accuracy (this model) | KL (this model) | Published Llama-2-7B ppl |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            pub = r.get("published_7b_ppl")
            lines.append(f"| {r['variant']} | {_gb(r['projected_7b_bytes'])} | {100 * (1 - r['projected_7b_bytes'] / fp):.1f}% | "
                         f"{100 * r[f'accuracy_{first}']:.2f}% | {r[f'kld_{first}']:.5f} | {'' if pub is None else f'{pub:.2f} (published)'} |")
    lines += ["", "![perplexity vs bits per weight](size_vs_ppl.png)", ""]
    return "\n".join(lines)
