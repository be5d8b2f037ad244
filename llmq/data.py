"""Text sources for calibration and evaluation, loaded through `datasets`.

A dataset spec is one of
  * a known name: ``wikitext2``, ``c4``, ``pile-val`` (fetched from the Hub on first use),
  * a local ``.txt`` / ``.raw`` (one document: the file as is), ``.jsonl``/``.json``
    or ``.parquet`` file (one row per record, ``text`` column),
  * any other Hub dataset as ``owner/name[:config][@split]``.

Evaluation follows the GPTQ paper: rows joined with "\\n\\n", tokenized once.
Calibration draws ``nsamples`` random ``seqlen`` windows from a seeded shuffle of the rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmq.errors import LlmqError


@dataclass(frozen=True)
class HubText:
    path: str
    config: str | None
    calib_split: str
    eval_split: str
    data_files: dict[str, str] = field(default_factory=dict)


KNOWN: dict[str, HubText] = {
    "wikitext2": HubText("wikitext", "wikitext-2-raw-v1", "train", "test"),
    "c4": HubText(
        "allenai/c4",
        None,
        "train",
        "validation",
        {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"},
    ),
    "pile-val": HubText("mit-han-lab/pile-val-backup", None, "validation", "validation"),
}

_LOCAL = {".txt": "text", ".raw": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _quiet_datasets() -> None:
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def load_rows(spec: str, split: str | None = None, purpose: str = "eval") -> list[str]:
    """The text rows of a dataset spec. ``purpose`` picks the default split of known names."""
    _quiet_datasets()
    from datasets import load_dataset

    path = Path(spec).expanduser()
    if path.suffix.lower() in _LOCAL or path.exists():
        if not path.is_file():
            raise LlmqError(f"dataset file {spec!r} does not exist")
        kind = _LOCAL.get(path.suffix.lower())
        if kind is None:
            raise LlmqError(f"dataset file {spec!r}: unsupported extension (use .txt, .jsonl, .json or .parquet)")
        extra = {"sample_by": "document"} if kind == "text" else {}
        try:
            ds = load_dataset(kind, data_files=str(path), split="train", **extra)
        except Exception as e:
            raise LlmqError(f"cannot read dataset file {spec!r}: {_first_line(e)}") from None
    elif spec in KNOWN:
        k = KNOWN[spec]
        s = split or (k.calib_split if purpose == "calib" else k.eval_split)
        ds = _load_hub(k.path, k.config, s, {s: k.data_files[s]} if k.data_files else None, spec)
    elif "/" in spec and not spec.startswith("."):
        name, _, hub_split = spec.partition("@")
        repo, _, config = name.partition(":")
        ds = _load_hub(repo, config or None, split or hub_split or ("train" if purpose == "calib" else "test"), None, spec)
    else:
        raise LlmqError(
            f"unknown dataset {spec!r}: use {', '.join(KNOWN)}, a .txt/.jsonl/.parquet file, or a hub dataset 'owner/name[:config][@split]'"
        )
    names = ds.column_names
    # Only a column named text: taking another string column (an id, a url, a label) would calibrate or
    # evaluate on the wrong data without a word.
    if "text" not in names or getattr(ds.features["text"], "dtype", None) != "string":
        raise LlmqError(f"dataset {spec!r} needs a 'text' column of strings (it has: {', '.join(names)})")
    return [r if r is not None else "" for r in ds["text"]]


def _load_hub(path: str, config: str | None, split: str, data_files: dict[str, str] | None, spec: str):
    from datasets import load_dataset

    try:
        return load_dataset(path, config, split=split, data_files=data_files)
    except Exception as e:
        raise LlmqError(f"cannot load dataset {spec!r} from the Hugging Face Hub: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    import transformers

    transformers.logging.set_verbosity_error()  # "sequence longer than model_max_length" is expected here
    return tokenizer(text, return_tensors="pt").input_ids[0]


def eval_tokens(tokenizer, spec: str, split: str | None = None) -> torch.Tensor:
    """All tokens of the evaluation text (1-D), GPTQ protocol: rows joined with blank lines."""
    rows = load_rows(spec, split, purpose="eval")
    return _tokenize(tokenizer, "\n\n".join(rows))


def calibration_tokens(tokenizer, spec: str, nsamples: int, seqlen: int, seed: int = 0, split: str | None = None) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens, deterministic for a given seed. Shape (nsamples, seqlen)."""
    rows = [r for r in load_rows(spec, split, purpose="calib") if r.strip()]
    if not rows:
        raise LlmqError(f"calibration dataset {spec!r} contains no text")
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    # Enough text for the windows (~4 chars/token, with margin) without tokenizing a whole corpus.
    budget = nsamples * seqlen * 8
    picked, chars = [], 0
    for i in order:
        picked.append(rows[i])
        chars += len(rows[i])
        if chars >= budget:
            break
    ids = _tokenize(tokenizer, "\n\n".join(picked))
    if ids.numel() < seqlen:
        raise LlmqError(f"calibration text {spec!r} has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
