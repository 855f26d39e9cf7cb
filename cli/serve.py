"""`sage serve`: serve every registered env over HTTP (see docs/server.md)."""

from __future__ import annotations

import ipaddress
import os
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (loopback by default)."),
    port: int = typer.Option(8765, help="TCP port."),
    token: Optional[str] = typer.Option(None, envvar="SAGE_SERVER_TOKEN",
                                        help="Require 'Authorization: Bearer TOKEN' on every request."),
    max_sessions: int = typer.Option(64, min=1, help="Most sessions (live envs) at a time."),
    idle_timeout: float = typer.Option(900.0, min=0.1, help="Seconds without a request before a session is closed."),
    max_response_chars: int = typer.Option(65_536, min=1, help="Longest accepted agent response."),
    threads: int = typer.Option(32, min=1, help="Worker threads stepping envs."),
    max_body_bytes: Optional[int] = typer.Option(None, min=1, help="Largest request body, refused with 413 before "
                                                 "it is read (default: 12 bytes per --max-response-chars + 64 KiB)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve the gym's envs over HTTP for agents in other processes or languages (client: sage_gym.remote.RemoteEnv)."""
    from sage_gym.server import ServerConfig, serve as run_server

    if token is None and not _is_loopback(host):
        console.print(f"[yellow]warning:[/] serving on {host} without --token: anyone who can reach it can run envs")
    config = ServerConfig(token=token, max_sessions=max_sessions, idle_timeout=idle_timeout,
                          max_response_chars=max_response_chars, threads=threads, max_body_bytes=max_body_bytes)
    console.print(f"SAGE env server on http://{host}:{port} (token {'required' if token else 'off'}, "
                  f"pid {os.getpid()})")
    run_server(host=host, port=port, config=config, log_level=log_level)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
