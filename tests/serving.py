"""Start a `sage ...` server command on a free 127.0.0.1 port for a test, and stop it afterwards."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

SAGE = str(Path(sys.executable).parent / "sage")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def sage_server(*args: str, headers: dict | None = None, wait: float = 90):
    """Run ``sage <args> --port P`` until ``GET /health`` answers 200; yield ``(url, process)``; SIGTERM it after."""
    port = free_port()
    proc = subprocess.Popen([SAGE, *args, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sage {args[0]} exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/health", headers=headers or {}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sage {args[0]} did not answer within {wait:g} s")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
