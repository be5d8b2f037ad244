"""Provenance: where a checkpoint came from, how it was made, and hashes to verify it."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import llmq
from llmq.errors import LlmqError

PROVENANCE_FILE = "llmq_provenance.json"


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path, skip: tuple[str, ...] = (PROVENANCE_FILE, "README.md")) -> dict[str, str]:
    # README.md is the model card `llmq push` generates: documentation, written after the record.
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def environment() -> dict[str, str]:
    import torch
    import transformers

    return {"llmq": llmq.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def record(source_name: str, source_revision: str | None, source_files: dict[str, str], recipe: dict[str, Any],
           files: dict[str, str]) -> dict[str, Any]:
    return {
        "llmq_version": llmq.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"model": source_name, "revision": source_revision, "files_sha256": source_files},
        "recipe": recipe,
        "environment": environment(),
        "files_sha256": files,
    }


def embedded(source_name: str, source_revision: str | None, source_files: dict[str, str],
             recipe: dict[str, Any]) -> dict[str, Any]:
    """The record a single-file format keeps inside the file (GGUF's metadata): no creation time, so that a
    rerun or a resumed run writes the same bytes, and no hash of the file that holds it."""
    r = record(source_name, source_revision, source_files, recipe, {})
    del r["created"], r["files_sha256"]
    return r


def verify(root: Path) -> list[str]:
    """Problems found when re-hashing a checkpoint against its provenance record (empty: intact).
    Every file is read and hashed once."""
    prov_file = root / PROVENANCE_FILE
    if not prov_file.is_file():
        return [f"no {PROVENANCE_FILE} in {root}"]
    try:
        recorded = json.loads(prov_file.read_text()).get("files_sha256", {})
        if not isinstance(recorded, dict):
            raise ValueError("files_sha256 is not a mapping")
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise LlmqError(f"{prov_file} is not a readable provenance record: {str(e).splitlines()[0]}") from None
    present = hash_tree(root)
    problems = [f"missing: {name}" if name not in present else f"modified: {name}"
                for name, digest in sorted(recorded.items()) if present.get(name) != digest]
    problems += [f"not in the record: {name}" for name in sorted(set(present) - set(recorded))]
    return problems
