"""The files runs write (sage_gym.durable): torn JSONL tails, lines that are not objects, atomic replaces,
checkpoint folders swapped in without a moment with none, and the run-folder lock across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sage_gym import durable
from sage_gym.durable import (FolderInUseError, FolderLock, RunFileError, append_jsonl, atomic_write_json,
                              read_json_object, read_jsonl, replace_dir, restore_aside)


def test_jsonl_torn_tail_is_cut_and_bad_lines_are_named(tmp_path):
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"step": 0})
    append_jsonl(log, {"step": 1})
    with open(log, "a") as f:
        f.write('{"step": 2, "lo')  # a kill during a write
    assert read_jsonl(log, repair=False) == [{"step": 0}, {"step": 1}] and log.read_text().endswith('"lo')
    assert read_jsonl(log) == [{"step": 0}, {"step": 1}]
    assert log.read_text() == '{"step": 0}\n{"step": 1}\n'  # cut off the file, so the next append is a clean line
    log.write_text('{"step": 0}\n[1, 2]\n{"step": 2}\n')
    with pytest.raises(RunFileError, match=r"metrics.jsonl:2 holds a JSON list, not an object"):
        read_jsonl(log)
    log.write_text('{"step": 0}\n{"ste\n{"step": 2}\n')
    with pytest.raises(RunFileError, match=r"metrics.jsonl:2 is not valid JSON"):
        read_jsonl(log)


def test_json_object_files_are_checked_and_written_atomically(tmp_path):
    path = tmp_path / "run.json"
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["run.json"]  # no temp file left
    for text, needle in (("", "empty or not valid JSON"), ("[1]", "holds a JSON list")):
        path.write_text(text)
        with pytest.raises(RunFileError, match=needle):
            read_json_object(path, "start over")


def test_replace_dir_never_leaves_no_folder(tmp_path, monkeypatch):
    final, new = tmp_path / "step-000002", tmp_path / ".tmp-step-000002"
    final.mkdir()
    (final / "w").write_text("old")
    new.mkdir()
    (new / "w").write_text("new")
    real, calls = os.replace, []

    def crash_on_second(src, dst):  # the old folder is set aside, then the process dies
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(src, dst)

    monkeypatch.setattr(durable.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, final)
    monkeypatch.setattr(durable.os, "replace", real)
    assert not final.exists()
    restore_aside(tmp_path)  # what the trainer does before it looks for checkpoints
    assert (final / "w").read_text() == "old"
    replace_dir(new, final)
    assert (final / "w").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["step-000002"]


def test_folder_lock_refuses_a_second_process_until_released(tmp_path):
    code = ("import sys; from sage_gym.durable import FolderLock, FolderInUseError\n"
            "try:\n    FolderLock(sys.argv[1], 'sage evaluate').acquire()\nexcept FolderInUseError as e:\n"
            "    print(e); sys.exit(7)\n")
    lock = FolderLock(tmp_path, "sage evaluate").acquire()
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert other.returncode == 7 and f"in use by another sage evaluate (pid {os.getpid()})" in other.stdout
    with pytest.raises(FolderInUseError):  # a second lock in this process too
        FolderLock(tmp_path).acquire()
    lock.release()
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == 0
