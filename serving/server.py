"""The gRPC scoring server.

    plexrec serve --model-dir runs/ml100k_sequence/models [--port 50051] [--metrics-port 9464]

Per call: validate the request (``INVALID_ARGUMENT`` naming the field), read the
user's profile and history from the online store and the candidates' features
through the item cache (features/online.py), take the schema's context features
from the request's ``context``, build the model inputs by training's rules
(serving/inputs.py), score them on the exported model's fast inference path
(recsys/inference.py, held to the exported model's scores to 1e-5) under
``torch.inference_mode``, return click probabilities. What is read follows the data set's schema (the
store's store.json); a model trained on another schema is refused at load.
Calls wait on the event loop; one model thread reads the store for a whole batch
of them, builds its inputs and scores it, and whatever arrived meanwhile is the
next batch (serving/batcher.py says why this shape).

This module is the server's lifecycle (ports, TLS, health, reflection, model reloads, the
command); the call itself is serving/service.py, the request's rules serving/requests.py, the
settings serving/config.py, the bearer token serving/token_interceptor.py.

Also served: standard gRPC health checking (``grpc.health.v1.Health``) and
server reflection. Optional TLS (``--tls-cert/--tls-key``) and bearer-token
authentication (``--token-file`` or $PLEXREC_TOKEN; health stays open for load
balancers). Prometheus metrics on ``--metrics-port``. A newer model version
under ``--model-dir`` is loaded in the background and swapped in atomically; a
broken one is refused with a log line and the old one keeps serving.

Load is shed, not queued without end: at most ``--max-concurrent-calls`` calls are
in the server at once (gRPC refuses the others with ``RESOURCE_EXHAUSTED``); a call that
would wait for the model longer than ``--max-queue-ms`` (by the measured cost of what is
queued ahead of it) is refused ``RESOURCE_EXHAUSTED`` at once, and so is one past
``--max-queued-rows`` candidate rows waiting; one that would be scored after its deadline is
answered ``DEADLINE_EXCEEDED`` at once (serving/batcher.py).
A request that is not a valid message of its type (random bytes, bad UTF-8) is ``INVALID_ARGUMENT``, like any bad field.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from features.online import DEFAULT_MAX_CACHED_BYTES, DEFAULT_MAX_CACHED_ITEMS, OnlineFeatures
from features.store import StoreError, data_dir, open_store
from recsys.export import ModelArtifactError
from serving.auth import TokenError, is_loopback, read_token
from serving.config import ServeConfig
from serving.metrics import ServingMetrics
from serving.model import ModelWatcher
from serving.processes import run_processes
from serving.service import SERVICE_NAME, ScoringService, add_scoring_service
from serving.token_interceptor import BearerTokenInterceptor

log = logging.getLogger("plexrec.serving")

__all__ = ["ScoringServer", "ServeConfig", "main", "serving_in_background"]


class ScoringServer:
    """The running server: ``await start()``, then ``port``, ``metrics_port``, ``await stop()``."""

    def __init__(self, config: ServeConfig, store) -> None:
        config.check()
        self.config = config
        # the store's store.json (schema, history length): what every model is checked against
        self.online = OnlineFeatures(store, ttl_seconds=config.item_cache_seconds,
                                     max_cached_items=config.item_cache_entries,
                                     max_cached_bytes=config.item_cache_bytes,
                                     published_vectors=False)  # the model computes them (serving/inputs.py)
        config.check_history(self.online.history_length)
        self.watcher = ModelWatcher(config.model_dir, self.online.meta, max_cached_items=config.item_cache_entries)
        self.metrics = ServingMetrics()
        self.metrics.model_version(self.watcher.current.version)
        self.service = ScoringService(self.watcher, self.online, config, self.metrics)
        self.health = health.aio.HealthServicer()
        self.port = self.metrics_port = None
        self._reload_task: asyncio.Task | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            self._release()  # a server that did not start leaves no thread or port behind
            raise

    async def _start(self) -> None:
        config = self.config
        interceptors = [BearerTokenInterceptor(config.token)] if config.token else []
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   # gRPC shares a port with another server by default: a second `plexrec serve` on a
                   # busy port would silently take half the calls; fail instead, unless this is one of
                   # the workers of `--processes`, which share it on purpose
                   ("grpc.so_reuseport", 1 if config.reuse_port else 0)]
        # past the limit gRPC answers RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!" itself (health
        # checks and reflection count too: grpcio 1.85 has one limit for the whole server)
        self.server = grpc.aio.server(interceptors=interceptors, options=options,
                                      maximum_concurrent_rpcs=config.max_concurrent_calls)
        add_scoring_service(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            self.server)
        address = f"{config.host}:{config.port}"
        if config.token and not config.tls_cert and not is_loopback(config.host):
            log.warning("the bearer token crosses the network in plaintext on %s: anyone on the path can read "
                        "and replay it; serve TLS (--tls-cert/--tls-key) or listen on a loopback address",
                        config.host or "every interface")
        try:
            if config.tls_cert or config.tls_key:
                if not (config.tls_cert and config.tls_key):
                    raise ValueError("TLS needs both --tls-cert and --tls-key")
                credentials = grpc.ssl_server_credentials(
                    [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's "Failed to bind"
            raise OSError(f"cannot listen on {address} ({exc}): is the port in use? choose another --port") from None
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(config.host, config.metrics_port)
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._reload_task = asyncio.create_task(self._watch_models())
        log.info("scoring on %s:%d (%s%s), model %s, metrics %s", config.host, self.port,
                 "TLS" if config.tls_cert else "plaintext", ", bearer token" if config.token else "",
                 self.watcher.current.version,
                 f"http://{config.host}:{self.metrics_port}/metrics" if self.metrics_port else "off")

    async def _watch_models(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.reload_seconds)
            try:
                # loading runs on its own thread: calls keep being answered by the old model meanwhile
                if await loop.run_in_executor(None, self.watcher.check):
                    self.metrics.model_version(self.watcher.current.version)
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad check
                log.exception("model check failed; still serving %s", self.watcher.current.version)

    async def stop(self, grace: float = 2.0) -> None:
        if self._reload_task:
            self._reload_task.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self._release()

    def _release(self) -> None:
        self.service.log_shed_calls()
        self.service.batcher.close()
        self.metrics.close()


@contextmanager
def serving_in_background(config: ServeConfig, store) -> Iterator[ScoringServer]:
    """A started server on an event loop of its own thread (tests, benchmarks, the quickstart);
    stopped on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="scoring-server", daemon=True)
    thread.start()

    async def start() -> ScoringServer:
        server = ScoringServer(config, store)
        await server.start()
        return server

    server = None
    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=120)
        yield server
    finally:
        if server is not None:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def serve_forever(config: ServeConfig, store) -> None:
    import signal

    server = ScoringServer(config, store)
    await server.start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    log.info("stopping")
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="plexrec serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True,
                        help="an exported model directory, or a root of versions (the newest is served and "
                             "newer ones are picked up)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument("--data-dir", help="the feature store's data directory (default: $PLEXREC_DATA_DIR or .plexrec)")
    parser.add_argument("--profile", default="local", choices=["local", "redis"])
    parser.add_argument("--redis-url", help="host:port of Redis for --profile redis")
    parser.add_argument("--max-candidates", type=int, default=1000)
    parser.add_argument("--max-batch-rows", type=int, default=4096,
                        help="concurrent calls share one forward of up to this many rows")
    parser.add_argument("--max-queued-rows", type=int, default=ServeConfig.max_queued_rows,
                        help="candidate rows that may wait for the model; a call past it is refused "
                             "RESOURCE_EXHAUSTED at once (at least --max-candidates)")
    parser.add_argument("--max-queue-ms", type=float, default=ServeConfig.max_queue_ms,
                        help="a call that would wait longer than this for the model (measured cost of the calls "
                             "queued ahead of it) is refused RESOURCE_EXHAUSTED at once; one that would be scored "
                             "after its deadline, DEADLINE_EXCEEDED (0: the deadline alone)")
    parser.add_argument("--max-concurrent-calls", type=int, default=ServeConfig.max_concurrent_calls,
                        help="calls in the server at once, health checks included; gRPC refuses the rest "
                             "RESOURCE_EXHAUSTED (0: no limit)")
    parser.add_argument("--item-cache-entries", type=int, default=DEFAULT_MAX_CACHED_ITEMS,
                        help="items whose features are cached, at most (least recently used evicted); "
                             "also the bound of the model's item vectors (serving/item_vectors.py): at least "
                             "--max-candidates and the store's history length; a batch of calls with more "
                             "distinct items is scored in pieces that fit")
    parser.add_argument("--item-cache-mib", type=float, default=DEFAULT_MAX_CACHED_BYTES / 2**20,
                        help="estimated memory of the item cache, at most, in MiB")
    parser.add_argument("--item-cache-seconds", type=float, default=60.0,
                        help="how long a cached item's features are used before they are read again")
    parser.add_argument("--reload-seconds", type=float, default=5.0, help="how often to look for a newer model")
    parser.add_argument("--processes", type=int, default=1,
                        help="scoring processes sharing the port (SO_REUSEPORT), one core each; metrics of "
                             "worker i on --metrics-port + i (serving/processes.py)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads of the forward (measured on 2 cores: 1 beats 2, which fight "
                             "the gRPC and store threads; scale out with replicas)")
    parser.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    parser.add_argument("--tls-key", help="PEM private key")
    parser.add_argument("--token-file", help="require 'authorization: Bearer <token>' with the token in this file "
                                             "(or set $PLEXREC_TOKEN)")
    args = parser.parse_args(argv)
    # force: importing fbgemm has already given the root logger a WARNING handler, which would swallow
    # every INFO line of the server (its address, model swaps)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    try:  # before anything loads: a server meant to be closed must not come up open
        token = read_token(args.token_file)
    except TokenError as exc:
        sys.exit(f"plexrec serve: {exc}")
    if args.processes < 1:
        sys.exit(f"plexrec serve: --processes must be at least 1, got {args.processes}")
    config = ServeConfig(model_dir=args.model_dir, host=args.host, port=args.port, metrics_port=args.metrics_port,
                         max_candidates=args.max_candidates,
                         max_batch_rows=args.max_batch_rows, max_queued_rows=args.max_queued_rows,
                         max_concurrent_calls=args.max_concurrent_calls or None,
                         max_queue_ms=args.max_queue_ms or None,
                         reload_seconds=args.reload_seconds, item_cache_seconds=args.item_cache_seconds,
                         item_cache_entries=args.item_cache_entries,
                         item_cache_bytes=int(args.item_cache_mib * 2**20),
                         tls_cert=args.tls_cert, tls_key=args.tls_key, token=token)

    def serve(config: ServeConfig, worker: int | None = None) -> None:
        # per worker: the workers of --processes are forked before torch has run anything (its thread
        # pools start at its first op)
        torch.set_num_threads(args.torch_threads)
        try:
            store = open_store(args.profile, data_dir(args.data_dir), args.redis_url)
            asyncio.run(serve_forever(config, store))
        except (StoreError, ModelArtifactError, ValueError, OSError) as exc:
            sys.exit(f"plexrec serve{'' if worker is None else f' (worker {worker})'}: {exc}")

    if args.processes == 1:
        serve(config)
        return

    try:
        config.check()  # once here: a bad flag fails before any worker starts
        sys.exit(run_processes(config, args.processes, serve))
    except (ValueError, OSError) as exc:
        sys.exit(f"plexrec serve: {exc}")


if __name__ == "__main__":
    main()
