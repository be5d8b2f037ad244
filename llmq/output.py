"""Outputs that appear whole or not at all.

Everything is written into a hidden temporary beside the target and renamed into place only when
complete, so a failed or interrupted run never leaves a half-written output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from llmq.errors import LlmqError


def _check_parent(path: Path) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlmqError(f"cannot create output directory {str(parent)!r}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LlmqError(f"output directory {str(parent)!r} is not writable")


class OutputDir:
    """``with OutputDir(path) as tmp: ...write into tmp...`` -> renamed to ``path`` on success."""

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path).expanduser()
        self.overwrite = overwrite
        if self.path.exists():
            if not self.path.is_dir():
                raise LlmqError(f"output {str(self.path)!r} exists and is not a directory")
            if any(self.path.iterdir()) and not overwrite:
                raise LlmqError(f"output directory {str(self.path)!r} is not empty (pass --overwrite to replace it)")
        _check_parent(self.path)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".llmq-tmp", dir=self.path.parent))
        except OSError as e:
            raise LlmqError(f"cannot write in {str(self.path.parent)!r}: {e.strerror}") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0700 would survive the rename
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.path.exists():
            shutil.rmtree(self.path)
        os.rename(self.tmp, self.path)


class OutputFile:
    """``with OutputFile(path) as tmp: ...write the file tmp...`` -> renamed to ``path`` on success."""

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path).expanduser()
        if self.path.exists() and (self.path.is_dir() or not overwrite):
            raise LlmqError(f"output {str(self.path)!r} exists" + ("" if self.path.is_dir() else " (pass --overwrite to replace it)"))
        _check_parent(self.path)
        self.tmp = self.path.with_name(f".{self.path.name}.llmq-tmp")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif self.tmp.exists():
            self.tmp.unlink()
