"""Debian's redis-server on a free loopback port: for tests, benchmarks and local trials."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from features.broker import free_port
from features.store import StoreError


@contextmanager
def local_redis_server(timeout_seconds: float = 10.0) -> Iterator[str]:
    """Start a throw-away Redis (no persistence), yield "127.0.0.1:port", stop it."""
    if shutil.which("redis-server") is None:
        raise StoreError("redis-server is missing: scripts/install.sh installs it (apt-get install redis-server)")
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise StoreError(f"redis-server on port {port} did not start within {timeout_seconds} s")
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)
