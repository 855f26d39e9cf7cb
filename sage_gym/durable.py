"""Files that runs write: atomic and durable (fsync of the file and of its folder), JSONL logs that
survive a kill mid-write, checkpoint folders swapped in without a moment with none, and a lock
that keeps a second process out of a run folder. Every writer of run state uses these."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sage_gym.errors import SageError


class RunFileError(SageError):
    """A run file that cannot be read back (a malformed line, a JSON file that is not an object)."""


class FolderInUseError(SageError):
    """Another process holds the lock of a run folder."""


def plain(obj: Any) -> Any:
    """JSON fallback for values envs may put in info (numpy scalars and arrays, paths)."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably: a reader sees the old or the new file, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False, default=plain) + "\n")


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold one object; a clear error (naming ``what`` to do) otherwise."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path} is empty or not valid JSON ({err}); {what}") from None
    if not isinstance(obj, dict):
        raise RunFileError(f"{path} holds a JSON {type(obj).__name__}, not an object; {what}")
    return obj


def append_jsonl(path: str | Path, *records: dict[str, Any]) -> None:
    """Append JSON lines (one per record) and fsync them once (and the folder when the file is new)."""
    path = Path(path)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False, default=plain) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    if new:
        fsync_dir(path.parent)


def read_jsonl(path: str | Path, repair: bool = True) -> list[dict[str, Any]]:
    """The objects of a JSONL file. A torn last line (a kill mid-write) is dropped, and cut off the file
    when ``repair``; a malformed line before the end or a line that is not a JSON object is an error."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records, good = [], 0
    for n, line in enumerate(data.splitlines(keepends=True), 1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            record = json.loads(line) if line.strip() else None
        except ValueError:
            if good + len(line) < len(data):
                raise RunFileError(f"{path}:{n} is not valid JSON: fix or remove that line") from None
            break
        if record is not None and not isinstance(record, dict):
            raise RunFileError(f"{path}:{n} holds a JSON {type(record).__name__}, not an object: every line must "
                               "be one JSON object; fix or remove that line")
        if record is not None:
            records.append(record)
        good += len(line)
    if repair and good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())
    return records


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace a JSONL file with ``records`` atomically and durably."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False, default=plain) + "\n" for r in records))


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root`` (before renaming a freshly written folder into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Move the fully written folder ``tmp`` to ``final`` durably. An existing ``final`` is first renamed
    aside (``.old-<name>``) and removed only once the new one is in place; a crash in between leaves the
    old folder aside, which ``restore_aside`` (run before reading the folders) puts back."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = _aside(final)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        fsync_dir(final.parent)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _aside(final: Path) -> Path:
    return final.with_name(f".old-{final.name}")


def restore_aside(parent: str | Path) -> None:
    """Finish any ``replace_dir`` a crash interrupted under ``parent``: an old folder set aside goes back
    where no new one arrived, and is removed where one did."""
    for old in Path(parent).glob(".old-*"):
        final = old.with_name(old.name.removeprefix(".old-"))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
            fsync_dir(old.parent)


class FolderLock:
    """An exclusive lock on a run folder (``<folder>/.lock``, flock): a second writer is refused at once
    with a clear message. The kernel releases it when the holder exits, even by kill -9."""

    def __init__(self, folder: str | Path, what: str = "run"):
        self.folder, self.what = Path(folder), what
        self._file = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        f = open(self.folder / ".lock", "a+")  # a file object: garbage collection closes (and unlocks) it too
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read(32).strip() or "?"
            f.close()
            raise FolderInUseError(f"{self.folder} is in use by another {self.what} (pid {holder}); wait for it to "
                                   "finish or pass another output folder") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the flock
            self._file = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
