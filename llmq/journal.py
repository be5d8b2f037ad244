"""The journal of a run's finished layers, kept in its work directory so that an interrupted run continues.

After each decoder layer the run records what it made of that layer (its QuantizedTensors, the float
parameters the method may have changed, the per-module log) and the output sink's state (what has been
written so far).  `quantize --resume` checks that it runs with the same settings, cuts the output back to
the last finished layer, recomputes the calibration activations by running the finished layers exactly as
they were left (no calibration, no rounding: the journaled values), and carries on.  The result is the
uninterrupted run's, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import llmq
from llmq.errors import LlmqError
from llmq.qtensor import QuantizedTensor

JOURNAL_DIR = ".llmq-journal"


@dataclass
class LayerEntry:
    qts: dict[str, QuantizedTensor]  # linear name (in the layer) -> its codes
    floats: dict[str, torch.Tensor]  # every other parameter of the layer, as the method left it
    records: list[dict[str, Any]]  # the per-module log


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({**settings, "llmq": llmq.__version__}, sort_keys=True, default=str).encode()).hexdigest()


class Journal:
    def __init__(self, work: Path, settings: dict[str, Any]):
        self.dir = work / JOURNAL_DIR
        self.hash = settings_hash(settings)

    def finished(self) -> tuple[int, Any]:
        """(layers finished, the sink's state after the last of them) of an interrupted run; (0, None) if none.
        A journal made with other settings is refused."""
        head = self.dir / "journal.json"
        if not head.is_file():
            return 0, None
        try:
            meta = json.loads(head.read_text())
        except ValueError:
            raise LlmqError(f"the journal of the interrupted run ({head}) is unreadable; run without --resume") from None
        if meta.get("settings") != self.hash:
            raise LlmqError("the interrupted run used other settings (model, recipe, format or llmq version); "
                            "run without --resume to start over")
        return meta["layers"], torch.load(self.dir / "sink.pt", weights_only=False)

    def layer(self, i: int) -> LayerEntry:
        return torch.load(self.dir / f"layer-{i:05d}.pt", weights_only=False)

    def record(self, i: int, entry: LayerEntry, sink_state: Any) -> None:
        """Layer ``i`` finished: its entry, then the sink's state, then the count, each written whole."""
        self.dir.mkdir(exist_ok=True)
        _save(entry, self.dir / f"layer-{i:05d}.pt")
        _save(sink_state, self.dir / "sink.pt")
        tmp = self.dir / "journal.json.tmp"
        tmp.write_text(json.dumps({"settings": self.hash, "layers": i + 1}))
        os.replace(tmp, self.dir / "journal.json")

    def clear(self) -> None:
        if self.dir.is_dir():
            for f in self.dir.iterdir():
                f.unlink()
            self.dir.rmdir()


def _save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()  # (serialised first: torch's own file writer turns a full disk into a RuntimeError)
    torch.save(obj, buf)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
