"""Sharing: a model card generated from a checkpoint's provenance, and upload to the Hugging Face Hub.

The token comes from the usual huggingface_hub mechanisms (HF_TOKEN, `hf auth login`) and
is never printed.  HF_ENDPOINT points the upload elsewhere (a mirror, or a test server).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from llmq.errors import LlmqError
from llmq.gguf.reader import is_gguf_file, provenance as gguf_provenance
from llmq.provenance import PROVENANCE_FILE

CARD = "README.md"  # the model card; documentation, so provenance hashes leave it out

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_repo_id(s: str | None) -> bool:
    return bool(s) and not s.startswith((".", "/", "~")) and s.count("/") <= 1 and bool(_REPO_ID.match(s))


def model_card(ckpt: Path, repo_id: str | None = None, base_model: str | None = None,
               report_rows: list[dict[str, Any]] | None = None) -> str:
    prov_file = ckpt / PROVENANCE_FILE
    prov = json.loads(prov_file.read_text()) if prov_file.is_file() else {}
    config = json.loads((ckpt / "config.json").read_text())
    q = config.get("quantization_config") or {}
    recipe = prov.get("recipe", {})
    source = (prov.get("source") or {}).get("model")
    method = codes_method(recipe, q)
    bits = q.get("bits") or ((q.get("config_groups") or {}).get("group_0", {}).get("weights") or {}).get("num_bits")
    fmt = q.get("quant_method", "none")
    tags = ["llmq", "quantized" if q else "converted", str(method)] + ([f"{bits}-bit"] if bits else []) + ([fmt] if fmt not in ("none", method) else [])
    name = repo_id or ckpt.name
    lines = [*_front({"library_name": "transformers"}, tags, base_model, source), f"# {name}", "",
             f"{'Quantized' if q else 'Converted'} with [llmq](https://pypi.org/project/llmq/) {prov.get('llmq_version', '')} "
             f"from `{source or 'unknown'}`: codes chosen by **{method}**" + (f", {bits}-bit" if bits else "") +
             (f", group size {q.get('group_size')}" if q.get("group_size") else "") + f", checkpoint format `{fmt}`.", "",
             *_recipe_and_quality(recipe, report_rows)]
    repo = repo_id or "<this repo>"
    lines += ["## How to load", "", "transformers:", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")',
              f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', "```", ""]
    backend = {"gptq": "`gptqmodel` (or `optimum` + `auto-gptq`)", "awq": "`autoawq`",
               "compressed-tensors": "`compressed-tensors`"}.get(fmt)
    if backend:
        lines += [f"(needs {backend} installed.)", ""]
    lines += ["vLLM:", "", "```bash", f"vllm serve {repo}", "```", "",
              "llama.cpp: this repository holds safetensors; for a GGUF file run "
              "`python -m llmq quantize --format gguf --gguf-type TYPE ...` on the source model.", "",
              "## Provenance", "", f"`{PROVENANCE_FILE}` records the source model and the sha256 of its files, the full recipe, "
              "tool versions and the sha256 of every file here; `python -m llmq verify DIR` re-checks them.", ""]
    return "\n".join(lines)


def gguf_card(path: Path, repo_id: str | None = None, base_model: str | None = None,
              report_rows: list[dict[str, Any]] | None = None) -> str:
    """The model card of a repository holding one GGUF file, from the provenance in its metadata."""
    prov = gguf_provenance(path)
    recipe = prov.get("recipe", {})
    source = (prov.get("source") or {}).get("model")
    method = codes_method(recipe, {})
    gtype = (recipe.get("gguf") or {}).get("file_type")
    repo = repo_id or "<this repo>"
    if prov:
        tags = ["llmq", "gguf", "quantized", method] + ([gtype] if gtype else [])
        made = (f"Quantized with [llmq](https://pypi.org/project/llmq/) {prov.get('llmq_version', '')} from `{source}`: "
                f"codes chosen by **{method}**" + (f", GGUF type `{gtype}`" if gtype else "") + ".")
    else:  # (a file llmq did not write: nothing is claimed about it)
        tags, made = ["gguf"], "A GGUF file whose metadata holds no llmq provenance: llmq did not write it."
    lines = [*_front({}, tags, base_model, source, quantized_by_llmq=bool(prov)), f"# {repo_id or path.stem}", "", made, "",
             *_recipe_and_quality(recipe, report_rows),
             "## How to load", "", "llama.cpp:", "", "```bash", f"llama-cli --hf-repo {repo} --hf-file {path.name} -p \"Once upon a time\"",
             f"llama-server --hf-repo {repo} --hf-file {path.name}", "```", "",
             "transformers (dequantizes to float on load):", "", "```python", "from transformers import AutoModelForCausalLM",
             f'model = AutoModelForCausalLM.from_pretrained("{repo}", gguf_file="{path.name}")', "```", "",
             *(["## Provenance", "", "The file's metadata key `llmq.provenance` records the source model and the sha256 "
                "of its files, the recipe and the tool versions.", ""] if prov else [])]
    return "\n".join(lines)


def _front(meta: dict[str, Any], tags: list[str], base_model: str | None, source: str | None,
           quantized_by_llmq: bool = True) -> list[str]:
    """The card's YAML front matter: ``meta``, the tags, and the base model (given, or the source when it is a hub id)."""
    meta = {**meta, "tags": list(dict.fromkeys(tags)), **({"quantized_by": "llmq"} if quantized_by_llmq else {})}
    base = base_model or (source if _looks_like_repo_id(source) else None)
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "quantized"
    return ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]


def _recipe_and_quality(recipe: dict[str, Any], report_rows: list[dict[str, Any]] | None) -> list[str]:
    lines = []
    if recipe:
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]
    if report_rows:
        keys = [k for k in report_rows[0] if k.startswith(("variant", "bits_per_weight", "ppl_", "kld_", "top1_"))]
        lines += ["## Measured quality", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in report_rows]
        lines.append("")
    return lines


def codes_method(recipe: dict[str, Any], qcfg: dict[str, Any]) -> str:
    """The method that chose the codes, which an export to another format keeps (never the format's name)."""
    while recipe.get("quantized_with"):  # (an export of an export of ...)
        recipe = recipe["quantized_with"]
    return recipe.get("method") or (qcfg.get("meta") or {}).get("method") or ("unknown" if qcfg else "fp")


def push(ckpt: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False, base_model: str | None = None,
         report: str | None = None, commit_message: str | None = None, card_out: str | Path | None = None) -> list[str]:
    """Upload a checkpoint directory, or one GGUF file, with a generated model card as its README.md.  The
    card goes into the upload only (and to ``card_out`` when given): the checkpoint is never written to."""
    d = Path(ckpt)
    single = is_gguf_file(d)
    if not single and (not d.is_dir() or not (d / "config.json").is_file()):
        raise LlmqError(f"{str(ckpt)!r} is neither a checkpoint directory (with a config.json) nor a .gguf file")
    if not _looks_like_repo_id(repo_id):
        raise LlmqError(f"--repo-id {repo_id!r} is not of the form user/name")
    rows = None
    if report:
        try:
            data = json.loads(Path(report).read_text())
            rows = [r for r, rec in zip(data["rows"], data["records"]) if Path(rec["checkpoint"]).resolve() == d.resolve()] or data["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LlmqError(f"cannot read the report {report!r}: {e}") from None
    card = gguf_card(d, repo_id, base_model, rows) if single else model_card(d, repo_id, base_model, rows)
    if card_out is not None:
        out = Path(card_out)
        if d.resolve() in out.resolve().parents or out.resolve() == d.resolve():
            raise LlmqError(f"--card {str(card_out)!r} is the checkpoint or lies inside it; write the card elsewhere")
        out.write_text(card)
    root = d.parent if single else d
    files = [d.name] if single else sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != CARD)
    if dry_run:
        return [*files, CARD]
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(root / f)) for f in files]
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode()))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo_id, repo_type="model", commit_message=commit_message or f"Upload {d.name} (llmq)",
                          operations=operations)
    except Exception as e:  # auth, network, permissions: the user's to fix; never echo the token
        raise LlmqError(f"upload to {repo_id!r} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return [*files, CARD]
