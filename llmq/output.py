"""Outputs that appear whole or not at all, written by one run at a time.

Everything is written into a hidden work directory beside the target (``.NAME.llmq-tmp``) and renamed
into place only when complete; an existing output is replaced only then.  An exclusive lock
(``.NAME.llmq-lock``) is held for the whole run: a second writer gets a clear error, and work left by a
run that died (killed, machine lost) is recognised as stale, since no one holds its lock, and removed,
unless the new run resumes it.  An output may never be, contain or lie inside one of the run's inputs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from llmq import interrupts
from llmq.errors import LlmqError


def _resolved(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()


def check_not_overlapping(out: Path, inputs: list[Path]) -> None:
    """``out`` may not be an input, contain one, or lie inside one (an overwrite would delete the input)."""
    o = _resolved(out)
    for i in inputs:
        r = _resolved(i)
        if o == r or o in r.parents or r in o.parents:
            raise LlmqError(f"output {str(out)!r} is, contains or lies inside the input {str(i)!r}; choose another --out")


class Lock:
    """An exclusive advisory lock on a path (flock on a lock file beside it), released on close."""

    def __init__(self, target: Path):
        self.path = target.with_name(f".{target.name}.llmq-lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise LlmqError(f"another llmq run is writing {str(self.path.with_name(self.path.name[1:-10]))!r}; "
                                    "wait for it to finish") from None
                raise
            # the file may have been removed by its previous holder between our open and our lock
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                self.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # (while still held: a waiting opener re-checks the inode)
            os.close(self.fd)
            self.fd = None


class Output:
    """``with Output(path) as work: ...`` -> ``work`` (a directory) becomes ``path`` on success.

    kind "dir": the work directory itself is the output; kind "file": the file ``work / FILE``.
    ``keep()`` during the run marks the work as resumable: an interrupted run then leaves it for --resume."""

    FILE = "output"

    def __init__(self, path: str | Path, *, kind: str = "dir", overwrite: bool = False, inputs: list[Path] = (),
                 resume: bool = False):
        self.path = Path(path).expanduser()
        self.kind = kind
        self.resume = resume
        check_not_overlapping(self.path, list(inputs))
        if self.path.exists():
            if kind == "dir" and not self.path.is_dir():
                raise LlmqError(f"output {str(self.path)!r} exists and is not a directory")
            if kind == "file" and self.path.is_dir():
                raise LlmqError(f"output {str(self.path)!r} is a directory")
            if (kind == "file" or any(self.path.iterdir())) and not overwrite:
                raise LlmqError(f"output {str(self.path)!r} exists" + (" and is not empty" if kind == "dir" else "")
                                + " (pass --overwrite to replace it)")
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LlmqError(f"cannot create output directory {str(parent)!r}: {e.strerror}") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise LlmqError(f"output directory {str(parent)!r} is not writable")
        self.work = parent / f".{self.path.name}.llmq-tmp"
        self.lock = Lock(self.path)
        self.resumable = False

    def __enter__(self) -> Path:
        self.lock.acquire()
        try:
            if self.resume and not self.work.is_dir():
                raise LlmqError(f"there is no interrupted run of {str(self.path)!r} to resume")
            for stale in self.path.parent.glob(f".{self.path.name}.llmq-*"):
                if stale != self.lock.path and not (self.resume and stale == self.work):
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()  # a dead run's (no one held its lock)
            self.work.mkdir(exist_ok=True)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.work, 0o777 & ~umask)
        except BaseException:
            self.lock.release()
            raise
        return self.work

    def keep(self) -> None:
        self.resumable = True

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
            elif not (self.resume or (self.resumable and interrupts.is_interrupt(exc_type))):
                # (a resumed run that fails keeps what the earlier run left; a run without --resume removes it)
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            self.lock.release()

    def _commit(self) -> None:
        """Swap the new output in: the old one is moved aside first and deleted only once the new one is in place."""
        new = self.work / self.FILE if self.kind == "file" else self.work
        old = self.path.with_name(f".{self.path.name}.llmq-old")
        if self.path.exists():
            os.rename(self.path, old)
        os.rename(new, self.path)
        if self.kind == "file":
            shutil.rmtree(self.work, ignore_errors=True)
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
