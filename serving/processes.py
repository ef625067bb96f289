"""``plexrec serve --processes N``: N scoring servers on one port, so one host's cores serve it.

One server process scores on one core at most: its event loop, its model thread and its store
reads share one GIL (serving/batcher.py). N processes take N cores. They share the port the
way gRPC's own example does (grpc/examples/python/multiprocessing): the parent binds the port
with SO_REUSEPORT and never listens on it, so the port stays held while workers come and go,
then forks the workers before it has made any gRPC object or loaded torch (gRPC's threads do
not survive a fork). Each worker binds the same port with SO_REUSEPORT and the kernel spreads
new connections over them; each opens its own store connection, model watcher and caches,
answers health checks, and serves its own Prometheus metrics (``--metrics-port`` + its index).

A connection stays with the worker that accepted it, so a client with one channel talks to one
worker: use ``--processes`` where many clients (or clients with many channels) call one host,
and replicas behind a load balancer where calls must be spread per call or across hosts. A
worker that dies is started again (its index, its metrics port); SIGTERM or SIGINT to the parent
stops them all.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from serving.config import ServeConfig

log = logging.getLogger("plexrec.serving")

RESTART_BACKOFF_SECONDS = 1.0
QUICK_DEATHS_TO_GIVE_UP = 3  # a worker that dies this many times in a row within a minute of its start


@contextmanager
def reserved_port(host: str, port: int) -> Iterator[int]:
    """``port`` on ``host`` (0: a free one) bound with SO_REUSEPORT and not listening: held for the
    workers. OSError naming the port when something else holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot hold {host}:{port} for the workers ({exc.strerror}): is the port in use? choose "
                      f"another --port") from None
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def worker_config(config: ServeConfig, port: int, index: int) -> ServeConfig:
    metrics_port = config.metrics_port
    if metrics_port:  # 0 stays 0: any free port, each its own
        metrics_port += index
    return replace(config, port=port, metrics_port=metrics_port, reuse_port=True)


def run_processes(config: ServeConfig, processes: int, serve: Callable[[ServeConfig, int], None]) -> int:
    """Fork ``processes`` workers, each running ``serve(its config, its index)`` on the held port,
    until SIGTERM/SIGINT; restart a worker that dies. Returns the exit status for the command."""
    with reserved_port(config.host, config.port) as port:
        workers: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
        quick_deaths = [0] * processes
        stopping = False

        def start(index: int) -> None:
            pid = os.fork()
            if pid == 0:  # the worker: the parent's handlers are not its own
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                status = 1
                try:
                    serve(worker_config(config, port, index), index)
                    status = 0
                except SystemExit as exc:
                    status = exc.code if isinstance(exc.code, int) else 1
                    if not isinstance(exc.code, int) and exc.code:
                        log.error("worker %d: %s", index, exc.code)
                except BaseException:  # noqa: BLE001 - a worker reports, then exits without the parent's cleanup
                    log.exception("worker %d failed", index)
                finally:
                    logging.shutdown()
                    os._exit(status)
            workers[pid] = (index, time.monotonic())
            log.info("worker %d started (pid %d) on %s:%d", index, pid, config.host, port)

        def stop(signum, frame) -> None:
            nonlocal stopping
            stopping = True
            for pid in list(workers):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

        for index in range(processes):
            start(index)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("%d scoring processes on %s:%d", processes, config.host, port)
        status = 0
        while workers:
            pid, wait_status = os.wait()
            if pid not in workers:
                continue
            index, started = workers.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if stopping:
                continue
            quick_deaths[index] = quick_deaths[index] + 1 if time.monotonic() - started < 60 else 1
            if quick_deaths[index] >= QUICK_DEATHS_TO_GIVE_UP:
                log.error("worker %d exited (%d) %d times within a minute of its start: stopping every worker; "
                          "see its log lines above", index, code, quick_deaths[index])
                status = 1
                stop(None, None)
                continue
            log.warning("worker %d (pid %d) exited (%d); starting it again", index, pid, code)
            time.sleep(RESTART_BACKOFF_SECONDS)
            start(index)
        return status
