"""The live half of the loop on one machine, for the quickstart and bench/freshness.py alike:
the event topic on a running broker, and ``plexrec ingest``, ``plexrec serve`` and ``plexrec learn``
as processes of their own over one store and one model root, each logging to a file, all stopped
(in reverse order) when the caller's ExitStack closes, also on an error or Ctrl-C."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from features.broker import free_port, stop_process
from features.ingest import ensure_topics
from recsys.config import PROJECT_ROOT
from serving.client import ScoringClient

log = logging.getLogger("plexrec.stack")


def stopped_process(process: subprocess.Popen, name: str) -> None:
    stop_process(process, timeout_seconds=20)
    log.info("stopped %s", name)


def start_process(stack: ExitStack, name: str, command: list[str], log_path: Path) -> subprocess.Popen:
    """A plexrec job as a child process, logging to ``log_path``, stopped when ``stack`` closes."""
    log_file = stack.enter_context(log_path.open("w"))  # closed after the process is stopped
    process = subprocess.Popen([sys.executable, "-m", "plexrec.cli", *command], cwd=PROJECT_ROOT,
                               stdout=subprocess.DEVNULL, stderr=log_file,
                               env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    stack.callback(stopped_process, process, name)
    log.info("started %s (pid %d, log %s)", name, process.pid, log_path)
    return process


def wait_for(condition, what: str, timeout: float, processes: dict[str, subprocess.Popen]) -> float:
    """Poll ``condition`` until true; seconds it took. Fails naming a child that died meanwhile."""
    started = time.monotonic()
    while not condition():
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode} while waiting for {what}; see its log")
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - started


@dataclass
class LocalServices:
    children: dict[str, subprocess.Popen]  # "ingester", "server", "learner"
    target: str  # the server's host:port
    metrics_port: int | None
    client: object  # serving.client.ScoringClient on ``target``, answering


def start_services(stack: ExitStack, *, bootstrap: str, topic: str, group: str, store_dir: Path, models: Path,
                   logs: Path, serve_flags: list[str] = (), learn_flags: list[str] = (),
                   metrics: bool = False) -> LocalServices:
    """Create ``topic`` (and its companions) with their partition counts before anything produces,
    start the three jobs, and wait until the server answers."""
    ensure_topics({"bootstrap_servers": bootstrap}, topic)
    port = free_port()
    metrics_port = free_port() if metrics else None
    store, model_root = ["--data-dir", str(store_dir)], ["--model-dir", str(models)]
    children = {
        "ingester": start_process(stack, "plexrec ingest", [
            "ingest", "--bootstrap-servers", bootstrap, "--topic", topic, "--group", group, *store],
            logs / "ingest.log"),
        "server": start_process(stack, "plexrec serve", [
            "serve", *model_root, *store, "--port", str(port),
            *(["--metrics-port", str(metrics_port)] if metrics else []), *serve_flags], logs / "serve.log"),
        "learner": start_process(stack, "plexrec learn", ["learn", *model_root, *store, *learn_flags],
                                 logs / "learn.log"),
    }
    target = f"127.0.0.1:{port}"
    client = stack.enter_context(ScoringClient(target, timeout=30))
    wait_for(client.serving, "the scoring server", 180, children)
    return LocalServices(children, target, metrics_port, client)
