"""The gRPC scoring server on loopback: real trained models, real local Feast stores.

ML-100K (most tests), a slice of KuaiRand-Pure (another schema: impressions, a user
table of 30 columns, the request context `tab`, user id 0), and a tiny generated
data set with a numeric context feature. The reference for every score is the
exported model on examples of the *direct* loader (build_examples on the joined
frame), not the store."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from features.load import load_into_store
from features.store import open_store, read_store_meta
from recsys.data.batching import make_batch, model_inputs
from features.examples import build_examples
from features.schema import DatasetSchema, FeatureGroup
from features.tables import DatasetTables, tables_from_frame
from recsys.export import ModelArtifactError, load_model
from recsys.train import Trainer
from serving.client import ScoringClient
from serving.inputs import InvalidContext, model_batch, request_context
from serving.model import load_serving_model
from serving.server import ServeConfig, serving_in_background

from .conftest import small_config

USER = 1  # 272 ratings in ML-100K: a long history


@pytest.fixture(scope="module")
def store_dir(ml100k_tables, tmp_path_factory):
    directory = tmp_path_factory.mktemp("serving-store")
    load_into_store(open_store("local", directory), ml100k_tables, directory, history_length=200)
    return directory


@pytest.fixture(scope="module")
def model_root(small_examples, tmp_path_factory):
    """A DARE ranker trained briefly on real data, exported under ``<root>/models/<version>``."""
    out = tmp_path_factory.mktemp("serving-run")
    config = small_config(epochs=1)
    config.sequence.mode, config.sequence.top_k, config.data.max_history = "dare", 16, 200
    result = Trainer(config, examples=small_examples, out_dir=out).fit(progress=False)
    return Path(result["model_dir"]).parent


@pytest.fixture(scope="module")
def server(store_dir, model_root):
    # no time target: these tests check answers, and a loaded machine must not shed their calls (shedding:
    # the flood tests and tests/test_batcher.py)
    config = ServeConfig(model_dir=str(model_root), port=0, metrics_port=0, max_queue_ms=None)
    with serving_in_background(config, open_store("local", store_dir)) as running:
        yield running


@pytest.fixture
def client(server):
    with ScoringClient(f"127.0.0.1:{server.port}") as scoring:
        yield scoring


def offline_scores(tables: DatasetTables, model_dir: Path, user: int, items: list[int],
                   context: dict | None = None) -> np.ndarray:
    """The reference: the direct loader (not the store) builds examples for ``user`` x ``items`` one
    time unit after the data ends, with ``context`` (typed as in the data; missing: absent) in the
    request rows; the exported model scores them."""
    schema, interactions = tables.schema, tables.interactions
    later = interactions[schema.timestamp].max() + 1
    request = pd.DataFrame({schema.user: user, schema.item: items, schema.timestamp: later,
                            schema.rating or schema.label: 0})
    for column, value in (context or {}).items():
        request[column] = value
    frame = tables.with_interactions(pd.concat([interactions, request], ignore_index=True)).joined()
    model, manifest = load_model(model_dir)
    examples = build_examples(frame, schema).keep_dense(manifest["dense_features"])
    rows = np.flatnonzero((examples.user_id == user) & (examples.timestamp == later))
    assert examples.item_id[rows].tolist() == items
    from recsys.config import RunConfig

    features, history_length = model_inputs(RunConfig.from_dict(manifest["config"]), examples.feature_names)
    batch = make_batch(examples, rows, features, history_length)
    with torch.inference_mode():
        return torch.sigmoid(model(batch.dense, batch.sparse)).numpy()


def test_server_scores_equal_the_offline_model_on_the_same_features(server, client, ml100k_tables):
    items = [50, 181, 7, 1682, 300, 1, 2, 1000]
    scores, version = client.score(USER, items)
    assert version == server.watcher.current.version
    reference = offline_scores(ml100k_tables, server.watcher.current.directory, USER, items)
    np.testing.assert_allclose(scores, reference, atol=1e-5)
    assert np.ptp(scores) > 1e-3  # the items are told apart, not one constant


@pytest.mark.parametrize("mode,dense", [("none", None), ("mean", None), ("none", ["log_item_prior_count"])])
def test_models_without_dare_serve_the_same_scores_as_offline(mode, dense, small_examples, store_dir, ml100k_tables,
                                                              tmp_path):
    """No history (mode none), whole-history pooling over a history shorter than the store's 200, and
    a model that reads one of the two counters (data.dense)."""
    config = small_config(epochs=1)
    config.sequence.mode, config.data.max_history, config.data.dense = mode, 50, dense
    model_dir = Path(Trainer(config, examples=small_examples, out_dir=tmp_path).fit(progress=False)["model_dir"])
    items = [50, 181, 7, 300]
    with serving_in_background(ServeConfig(model_dir=str(model_dir), port=0), open_store("local", store_dir)) as running:
        with ScoringClient(f"127.0.0.1:{running.port}") as scoring:
            scores, _ = scoring.score(USER, items)
    np.testing.assert_allclose(scores, offline_scores(ml100k_tables, model_dir, USER, items), atol=1e-5)


def test_rank_returns_the_best_k_in_order(client):
    items = list(range(1, 101))
    scores, _ = client.score(USER, items)
    ranked = client.rank(USER, items, k=10)
    assert [item for item, _ in ranked] == [items[i] for i in np.argsort(-np.array(scores), kind="stable")[:10]]
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    assert len(client.rank(USER, items[:5])) == 5  # k = 0: all


def test_one_batch_of_several_calls_scores_each_as_alone(server, store_dir):
    from features.online import OnlineFeatures

    model, online = server.watcher.current, OnlineFeatures(open_store("local", store_dir))
    requests = [(online.user(u), list(online.items(items).values()))
                for u, items in [(USER, [1, 2, 3]), (10_000_000, [4]), (2, [5, 1, 1682]), (USER, [7, 8])]]
    history = {}
    for user, _ in requests:
        history.update(online.items(user.history_item_ids))
    together = model.probabilities(model.batch(requests, history))
    alone = np.concatenate([model.probabilities(model.batch([request], history)) for request in requests])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    assert model.shares_histories  # a DARE model: each user's history went in once
    per_row = model.eager_probabilities(model_batch(model.schema, requests, history, model.input_features,
                                              model.history_length, share_histories=False))
    np.testing.assert_allclose(together, per_row, atol=1e-6)


def test_concurrent_calls_share_forwards_and_get_their_own_scores(server):
    users, items = [USER, 2, 3, 5, 6, 10, 13, 15], list(range(1, 301))
    with ScoringClient(f"127.0.0.1:{server.port}") as alone:
        expected = {u: alone.score(u, items)[0] for u in users}
    failures = []

    def call(user: int) -> None:  # (an exception in a thread would go unseen: failures are collected)
        with ScoringClient(f"127.0.0.1:{server.port}") as scoring:
            done = refused = 0
            while done < 5 and refused < 200:
                try:
                    scores, _ = scoring.score(user, items)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # shed (--max-queue-ms): back off
                        refused += 1
                        time.sleep(0.01)
                    else:
                        failures.append((user, exc.code(), exc.details()))
                        done += 1
                    continue
                done += 1
                if not np.allclose(scores, expected[user], atol=1e-5):
                    failures.append((user, "wrong scores"))
            if done < 5:
                failures.append((user, "refused 200 times"))

    def impatient() -> None:  # calls whose deadline passes mid-flight (or would: refused at once), which
        # must not fail the others
        with ScoringClient(f"127.0.0.1:{server.port}", timeout=0.01) as scoring:
            for _ in range(10):
                try:
                    scoring.score(USER, list(range(1, 1001)))
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED):
                        failures.append(("impatient", exc.code(), exc.details()))

    threads = [threading.Thread(target=call, args=(u,)) for u in users] + \
        [threading.Thread(target=impatient) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    shared = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("plexrec_batch_calls_sum", "plexrec_batch_calls_count"))}
    assert shared["plexrec_batch_calls_sum"] > shared["plexrec_batch_calls_count"]  # some forwards were shared


def test_unknown_users_and_items_get_cold_start_scores(client):
    scores, _ = client.score(10_000_000, [1, 99_999_999])
    assert all(0.0 < s < 1.0 for s in scores)


MISSING = object()


@pytest.mark.parametrize("change,field", [
    ({"user_id": MISSING}, "user_id"),
    ({"user_id": -3}, "user_id"),
    ({"item_ids": []}, "item_ids"),
    ({"item_ids": [1, -2]}, "item_ids"),
    ({"item_ids": [1, 2, 1]}, "item_ids"),
    ({"item_ids": list(range(1, 1002))}, "item_ids"),
    ({"context": {"k": "v" * 300}}, "context"),
    ({"request_id": "r" * 200}, "request_id"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(client, change, field):
    from protos.plexrec.v1 import scoring_pb2

    fields = {key: value for key, value in {"user_id": USER, "item_ids": [1, 2], **change}.items()
              if value is not MISSING}
    request = scoring_pb2.ScoreRequest(**fields)
    with pytest.raises(grpc.RpcError) as error:
        client.stub.Score(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:")
    if change.get("user_id") is MISSING:
        assert error.value.details() == "user_id: is missing; send the user's id (>= 0)"
        with pytest.raises(grpc.RpcError) as error:  # Rank too
            client.stub.Rank(scoring_pb2.RankRequest(item_ids=[1, 2]), timeout=10)
        assert error.value.details().startswith("user_id: is missing")


def test_id_zero_is_an_id_not_a_missing_value(client):
    """ML-100K has no user or item 0: both score with cold-start defaults, like any unknown id."""
    scores, _ = client.score(0, [0, 1])
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)


def test_oversize_messages_and_deadlines(client):
    with pytest.raises(grpc.RpcError) as error:
        client.score(USER, [1], context={"blob": "x" * (2 << 20)})
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    hurried = ScoringClient(client.channel._channel.target().decode(), timeout=1e-4)
    with pytest.raises(grpc.RpcError) as error:
        hurried.score(USER, list(range(1, 1001)))
    hurried.close()
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_port_in_use_is_named(server, store_dir, model_root):
    config = ServeConfig(model_dir=str(model_root), port=server.port)
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{server.port}.*choose another --port"):
        with serving_in_background(config, open_store("local", store_dir)):
            pass


def test_health_checks_and_reflection(client):
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "plexrec.v1.Scoring"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"plexrec.v1.Scoring", "grpc.health.v1.Health"} <= names


def test_metrics_count_calls_errors_and_stages(server, client):
    client.score(USER, [1, 2, 3])
    with pytest.raises(grpc.RpcError):
        client.score(-1, [1])
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['plexrec_calls_total{method="Score"}'] >= 2
    assert values['plexrec_errors_total{code="INVALID_ARGUMENT",method="Score"}'] >= 1
    for stage in ("feature_fetch", "model_inputs", "forward", "total"):
        assert values[f'plexrec_latency_seconds_count{{stage="{stage}"}}'] >= 1
    assert values[f'plexrec_model_info{{version="{server.watcher.current.version}"}}'] == 1


def test_cli_score_prints_the_scores(server, client):
    done = subprocess.run([sys.executable, "-m", "plexrec.cli", "score", "--target", f"127.0.0.1:{server.port}",
                           "--user", str(USER), "--items", "50,181"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    scores, _ = client.score(USER, [50, 181])
    printed = [float(line.split()[1]) for line in done.stdout.splitlines()[1:3]]
    np.testing.assert_allclose(printed, scores, atol=1e-4)
    bad = subprocess.run([sys.executable, "-m", "plexrec.cli", "score", "--target", f"127.0.0.1:{server.port}",
                          "--user", "-1", "--items", "1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "INVALID_ARGUMENT: user_id" in bad.stderr


def with_version(source: Path, root: Path, version: str) -> Path:
    """A copy of an exported model under another version name."""
    target = root / version
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["model_version"] = version
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_new_versions_swap_in_under_load_and_broken_ones_are_refused(store_dir, model_root, tmp_path, caplog):
    root = tmp_path / "models"
    first = with_version(next(model_root.iterdir()), root, "20200101T000000-00000001")
    # no time target: every call must be answered (shedding under load: the flood tests)
    config = ServeConfig(model_dir=str(root), port=0, reload_seconds=0.2, max_queue_ms=None)
    failures, versions, stop = [], [], threading.Event()
    with serving_in_background(config, open_store("local", store_dir)) as running:
        def load() -> None:
            with ScoringClient(f"127.0.0.1:{running.port}") as scoring:
                while not stop.is_set():
                    try:
                        versions.append(scoring.score(USER, list(range(1, 51)))[1])
                    except grpc.RpcError as exc:
                        failures.append(exc)

        callers = [threading.Thread(target=load) for _ in range(4)]
        for caller in callers:
            caller.start()
        with caplog.at_level(logging.ERROR, logger="plexrec.serving.model"):
            broken = with_version(first, root, "20300101T000000-deadbeef")
            (broken / "weights.safetensors").write_bytes(b"not a tensor file")
            deadline = time.monotonic() + 30
            while "20300101T000000-deadbeef" not in running.watcher.refused and time.monotonic() < deadline:
                time.sleep(0.1)
            with_version(first, root, "20400101T000000-00000002")
            while running.watcher.current.version != "20400101T000000-00000002" and time.monotonic() < deadline:
                time.sleep(0.1)
            # Counted, not timed: a loaded CI machine may answer only a few calls in half a second.
            while versions.count("20400101T000000-00000002") < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
        stop.set()
        for caller in callers:
            caller.join()
    assert not failures, failures[:3]
    assert "refused model 20300101T000000-deadbeef" in caplog.text
    assert versions[0] == "20200101T000000-00000001" and versions[-1] == "20400101T000000-00000002"
    assert "20300101T000000-deadbeef" not in versions
    switch = versions.index("20400101T000000-00000002")
    assert switch > 0 and versions.count("20400101T000000-00000002") >= 10


def test_a_refused_version_is_retried_only_once_its_files_change(store_dir, model_root, tmp_path, caplog):
    from serving.model import ModelWatcher

    root = tmp_path / "models"
    first = with_version(next(model_root.iterdir()), root, "20200101T000000-00000001")
    watcher = ModelWatcher(root, read_store_meta(store_dir))
    late = with_version(first, root, "20300101T000000-1a7e1a7e")
    good_weights = (late / "weights.safetensors").read_bytes()
    (late / "weights.safetensors").write_bytes(good_weights[:100])  # a copy still in progress
    with caplog.at_level(logging.ERROR, logger="plexrec.serving.model"):
        assert not watcher.check() and not watcher.check()
    assert caplog.text.count("refused model 20300101T000000-1a7e1a7e") == 1  # not retried while unchanged
    (late / "weights.safetensors").write_bytes(good_weights)  # the copy completes
    assert watcher.check() and watcher.current.version == "20300101T000000-1a7e1a7e"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem")],
                   check=True, capture_output=True)
    return directory / "cert.pem", directory / "key.pem"


def test_tls_and_bearer_token(store_dir, model_root, certificate):
    cert, key = certificate
    config = ServeConfig(model_dir=str(model_root), port=0, tls_cert=str(cert), tls_key=str(key), token="s3cret")
    with serving_in_background(config, open_store("local", store_dir)) as running:
        target = f"localhost:{running.port}"
        with ScoringClient(target, token="s3cret", root_certificates=cert.read_bytes()) as trusted:
            assert len(trusted.score(USER, [1, 2])[0]) == 2
            health = health_pb2_grpc.HealthStub(trusted.channel)  # health needs no token
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        for token in (None, "wrong"):
            with ScoringClient(target, token=token, root_certificates=cert.read_bytes()) as stranger:
                with pytest.raises(grpc.RpcError) as error:
                    stranger.score(USER, [1, 2])
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with ScoringClient(target, token="s3cret") as plaintext:  # a TLS server refuses plaintext
            with pytest.raises(grpc.RpcError) as error:
                plaintext.score(USER, [1])
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_serving_imports_no_training_and_the_client_no_torch():
    code = "import sys, serving.server, serving.client; print('recsys.train' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
    code = "import sys, serving.client; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


# --- guarantees under faults: the model root, the token, the item cache, load shedding ---

STRANGER = 10_000_000  # a user the store does not know: no history, so a call reads only its candidates


def test_directories_that_are_not_versions_are_ignored_with_one_log_line(store_dir, model_root, tmp_path, caplog):
    """A `backup` (a copy of an older version), an empty `tmp` and a file beside the versions: by name
    the directories sort after every version. The server starts on the newest version, names them in
    one log line (not one per poll) and still picks up a newer version."""
    root = tmp_path / "models"
    first = with_version(next(model_root.iterdir()), root, "20200101T000000-00000001")
    shutil.copytree(first, root / "backup")
    (root / "tmp").mkdir()
    (root / "NOTES.txt").write_text("backup/ is the model of January\n")
    (root / ".20250101T000000-0000000f.tmp").mkdir()  # export's staging directory: skipped without a word
    config = ServeConfig(model_dir=str(root), port=0, reload_seconds=0.05)
    with caplog.at_level(logging.INFO, logger="plexrec.serving.model"):
        with serving_in_background(config, open_store("local", store_dir)) as running:
            assert running.watcher.current.version == "20200101T000000-00000001"
            time.sleep(0.5)  # about ten polls
            with_version(first, root, "20400101T000000-00000002")
            deadline = time.monotonic() + 30
            while running.watcher.current.version != "20400101T000000-00000002" and time.monotonic() < deadline:
                time.sleep(0.05)
            with ScoringClient(f"127.0.0.1:{running.port}") as scoring:
                assert scoring.score(USER, [1, 2])[1] == "20400101T000000-00000002"
    ignored = [r.getMessage() for r in caplog.records if "not model versions" in r.getMessage()]
    assert len(ignored) == 1, ignored
    assert "ignoring backup, tmp:" in ignored[0]


def test_an_empty_or_unreadable_token_file_stops_serve_saying_what_to_do(store_dir, model_root, tmp_path):
    from serving.server import main as serve

    empty = tmp_path / "token"
    empty.write_text("\n")
    # the CLI in a process of its own: the old behaviour (authentication off) served forever
    done = subprocess.run([sys.executable, "-m", "plexrec.cli", "serve", "--model-dir", str(model_root),
                           "--data-dir", str(store_dir), "--port", "0", "--token-file", str(empty)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"plexrec serve: --token-file {empty} is empty: put the token there" in done.stderr
    assert "Traceback" not in done.stderr
    for unreadable, why in ((tmp_path / "missing", "No such file or directory"), (tmp_path, "Is a directory")):
        with pytest.raises(SystemExit) as stopped:
            serve(["--model-dir", str(model_root), "--data-dir", str(store_dir), "--port", "0",
                   "--token-file", str(unreadable)])
        assert str(stopped.value.code).startswith(f"plexrec serve: cannot read --token-file {unreadable} ({why}): ")


def test_serve_with_processes_spreads_connections_over_workers_on_one_port(store_dir, model_root, tmp_path):
    """`plexrec serve --processes 2`: two workers answer on one port (each its own metrics port), 16
    clients of their own connection each are scored by both, another server cannot take the port,
    a killed worker is started again, and SIGTERM stops them all."""
    import signal
    import urllib.request

    from features.broker import free_port

    port, metrics = free_port(), free_port()
    while metrics + 1 == port:
        metrics = free_port()
    command = [sys.executable, "-m", "plexrec.cli", "serve", "--model-dir", str(model_root), "--data-dir",
               str(store_dir), "--port", str(port), "--metrics-port", str(metrics), "--processes", "2"]
    log_path = tmp_path / "serve.log"
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_path.open("w"))

    def calls_by_worker() -> list[float]:
        counts = []
        for worker_port in (metrics, metrics + 1):
            text = urllib.request.urlopen(f"http://127.0.0.1:{worker_port}/metrics", timeout=10).read().decode()
            counts.append(sum(float(line.split()[-1]) for line in text.splitlines()
                              if line.startswith("plexrec_calls_total")))
        return counts

    def score_on_fresh_connections(n: int) -> None:
        for _ in range(n):
            with ScoringClient(f"127.0.0.1:{port}", timeout=30) as client:
                assert len(client.score(USER, [1, 2, 3])[0]) == 3

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                calls_by_worker()
                break
            except OSError:
                assert parent.poll() is None and time.monotonic() < deadline, "the workers did not come up"
                time.sleep(0.5)
        score_on_fresh_connections(16)
        counts = calls_by_worker()
        assert sum(counts) == 16 and min(counts) >= 1, counts  # all 16 on one worker: odds 2**-15
        squatter = subprocess.run([sys.executable, "-m", "plexrec.cli", "serve", "--model-dir", str(model_root),
                                   "--data-dir", str(store_dir), "--port", str(port)],
                                  capture_output=True, text=True, timeout=120)
        assert squatter.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in squatter.stderr
        worker = int(re.search(r"worker 1 started \(pid (\d+)\)", log_path.read_text()).group(1))
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:  # worker 1 again, on its metrics port, counting from 0
            try:
                if calls_by_worker()[1] == 0:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "worker 1 was not started again"
            time.sleep(0.5)
        score_on_fresh_connections(16)
        assert calls_by_worker()[1] >= 1
    finally:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 0, log_path.read_text()
    assert "worker 1 (pid" in log_path.read_text() and "exited (-9); starting it again" in log_path.read_text()
    with pytest.raises(OSError):
        calls_by_worker()  # the workers are gone too


def test_a_token_variable_that_is_set_must_hold_a_usable_token():
    from serving.auth import TokenError, read_token

    assert read_token(None, {}) is None  # nothing given: no authentication
    assert read_token(None, {"PLEXREC_TOKEN": "s3cret\n"}) == "s3cret"
    for value, problem in (("", "is empty"), ("  \n", "is empty"), ("two words", "whitespace")):
        with pytest.raises(TokenError, match=problem):
            read_token(None, {"PLEXREC_TOKEN": value})
    with pytest.raises(ValueError, match="the bearer token is empty"):
        ServeConfig(model_dir="models", token="").check()


def test_a_token_without_tls_off_loopback_is_warned_about(store_dir, model_root, caplog):
    from serving.auth import is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "", "::", "10.1.2.3", "scoring.example.com"]))
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False)):
        caplog.clear()
        config = ServeConfig(model_dir=str(model_root), host=host, port=0, token="s3cret")
        with caplog.at_level(logging.WARNING, logger="plexrec.serving"):
            with serving_in_background(config, open_store("local", store_dir)):
                pass
        assert ("the bearer token crosses the network in plaintext on 0.0.0.0" in caplog.text) == warned, host


def test_score_tls_checks_the_server_against_the_default_roots(store_dir, model_root, certificate):
    """`plexrec score --tls` trusts gRPC's default root certificates; pointing those at the test CA
    ($GRPC_DEFAULT_SSL_ROOTS_FILE_PATH) makes the self-signed server trusted, and only then."""
    import os

    cert, key = certificate
    config = ServeConfig(model_dir=str(model_root), port=0, tls_cert=str(cert), tls_key=str(key))
    with serving_in_background(config, open_store("local", store_dir)) as running:
        command = [sys.executable, "-m", "plexrec.cli", "score", "--target", f"localhost:{running.port}",
                   "--user", str(USER), "--items", "1,2", "--tls"]
        trusted = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(cert)})
        stranger = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert trusted.returncode == 0, trusted.stderr
    assert len(trusted.stdout.splitlines()) == 4  # a header, two items, the model version
    assert stranger.returncode == 1 and "plexrec score: UNAVAILABLE" in stranger.stderr


def test_the_item_cache_is_an_lru_bounded_in_entries_and_bytes():
    """Random gets (of one id, and of several at once: get_many), puts (80 ids, entries of very
    different sizes, one too big to cache at all) and expiries against a plain OrderedDict model of
    an LRU with the same two bounds: after every step the same ids in the same order and the same
    byte count."""
    import random
    from collections import OrderedDict

    from features.online import ItemCache, ItemFeatures

    rng = random.Random(0)
    max_entries, max_bytes = 20, 40_000
    cache = ItemCache(max_entries, max_bytes, ttl_seconds=40)  # get_many sees some entries expire
    reference: OrderedDict[int, int] = OrderedDict()  # id -> bytes, least recently used first
    evictions = 0
    stored_at: dict[int, float] = {}
    for step in range(3000):
        item_id = rng.randrange(80)
        if rng.random() < 0.2:
            wanted = list(dict.fromkeys(rng.randrange(80) for _ in range(rng.randrange(1, 12))))
            now = float(step)
            found, missing = cache.get_many(wanted, now)
            fresh = [i for i in wanted if i in reference and now - stored_at[i] < cache.ttl_seconds]
            assert list(found) == fresh and missing == [i for i in wanted if i not in fresh]
            assert all(found[i].item_id == i for i in fresh)
            for i in fresh:
                reference.move_to_end(i)
            assert cache.ids() == list(reference)
            continue
        if rng.random() < 0.4:
            found = cache.get(item_id, now=0.0)
            assert (found is not None) == (item_id in reference)
            if found is not None:
                assert found.item_id == item_id
                reference.move_to_end(item_id)
            continue
        features = ItemFeatures(item_id=item_id, attention_embedding=[rng.random()] * rng.choice([0, 8, 64, 256, 1500]))
        size = ItemCache.entry_bytes(features)
        cache.put(item_id, features, now=float(step))
        stored_at[item_id] = float(step)
        reference.pop(item_id, None)
        if size <= max_bytes:
            reference[item_id] = size
        while len(reference) > max_entries or sum(reference.values()) > max_bytes:
            reference.popitem(last=False)
            evictions += 1
        assert cache.ids() == list(reference)
        assert cache.bytes == sum(reference.values()) <= max_bytes and len(cache) <= max_entries
    assert cache.evictions == evictions > 100


def test_the_item_caches_byte_count_tracks_the_memory_it_holds():
    """What filling the cache allocates (tracemalloc) against the cache's own estimate: never less,
    at most half again as much; for known items (profile, category, two 64-d embeddings) and unknown."""
    import tracemalloc

    from features.online import ItemCache, ItemFeatures

    def known(item_id: int) -> ItemFeatures:
        return ItemFeatures(item_id=item_id, profile={"genres": ["Comedy", "Drama"], "release_year": 1995},
                            category="Comedy", interaction_count=item_id % 97,
                            attention_embedding=[item_id / (j + 1) for j in range(64)],
                            representation_embedding=[item_id / (j + 2) for j in range(64)],
                            model_version="20240101T000000-0123abcd")

    for make in (known, lambda item_id: ItemFeatures(item_id=item_id)):
        cache = ItemCache(max_entries=10**6, max_bytes=10**12)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for item_id in range(10**9, 10**9 + 2000):
                cache.put(item_id, make(item_id), now=0.0)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert held <= cache.bytes <= 1.5 * held, (held, cache.bytes)


@pytest.mark.parametrize("bound", ["entries", "bytes"])
def test_a_stream_of_unknown_ids_keeps_the_item_cache_within_its_bounds(store_dir, model_root, bound):
    """60 calls of 100 new unknown ids each (6,000 in all) and one known item in every call; the
    cache holds about 300 entries either way (300 entries, or 200 kB of ~0.7 kB unknown items)."""
    limits = {"entries": {"item_cache_entries": 300, "item_cache_bytes": 64 << 20, "max_candidates": 101},
              "bytes": {"item_cache_entries": 100_000, "item_cache_bytes": 200_000}}[bound]
    config = ServeConfig(model_dir=str(model_root), port=0, **limits)
    hot, first_unknown = 50, 10**12
    with serving_in_background(config, open_store("local", store_dir)) as running:
        cache = running.online.item_cache
        with ScoringClient(f"127.0.0.1:{running.port}") as scoring:
            for call in range(60):
                unknown = range(first_unknown + 100 * call, first_unknown + 100 * (call + 1))
                scores, _ = scoring.score(STRANGER, [hot, *unknown])
                assert len(scores) == 101
                assert len(cache) <= limits["item_cache_entries"] and cache.bytes <= limits["item_cache_bytes"]
        assert hot in cache  # used by every call: the least recently used went first, not the oldest
        assert first_unknown not in cache and first_unknown + 5999 in cache
        assert cache.evictions >= 6000 - 300
        used = len(cache) / limits["item_cache_entries"] if bound == "entries" else \
            cache.bytes / limits["item_cache_bytes"]
        assert used > 0.9  # the bound, not something else, stopped the growth


def test_calls_that_score_alone_score_together_past_the_item_cache(store_dir, model_root):
    """Issue 21: with --item-cache-entries below a batch's distinct items, calls that scored alone
    failed INTERNAL once the batcher merged them (the model's item vector cache cannot hold one
    forward's items). On a cache of 250 entries, three calls of 100 distinct candidates each (300
    together) for users of long, different histories (more than 250 distinct items together) wait
    for the model thread until all three are queued, so the batcher takes them as one batch: each
    gets the scores it gets alone."""
    from features.online import OnlineFeatures
    from protos.plexrec.v1 import scoring_pb2

    users = [USER, 13, 405]
    items = {user: list(range(1 + 100 * k, 101 + 100 * k)) for k, user in enumerate(users)}
    online = OnlineFeatures(open_store("local", store_dir))
    histories = set().union(*(online.user(user).history_item_ids[-200:] for user in users))
    assert len(histories) > 250  # the histories alone overflow the cache too
    config = ServeConfig(model_dir=str(model_root), port=0, item_cache_entries=250, max_candidates=100,
                         max_queue_ms=None)  # every call answered: it is the batch that is tested
    with serving_in_background(config, open_store("local", store_dir)) as running:
        with ScoringClient(f"127.0.0.1:{running.port}") as scoring:
            alone = {user: scoring.score(user, items[user])[0] for user in users}
            batcher = running.service.batcher
            release = threading.Event()
            batcher._model_thread.submit(release.wait, 60)  # the model thread is busy: calls wait
            before = batcher.batches
            first = scoring.stub.Score.future(scoring_pb2.ScoreRequest(user_id=STRANGER, item_ids=[1]), timeout=60)
            waiting = time.monotonic() + 30
            while batcher.batches == before and time.monotonic() < waiting:  # taken alone, waiting for the thread
                time.sleep(0.01)
            calls = [scoring.stub.Score.future(scoring_pb2.ScoreRequest(user_id=user, item_ids=items[user]),
                                               timeout=60) for user in users]
            while len(batcher.pending) < len(users) and time.monotonic() < waiting:
                time.sleep(0.01)
            assert len(batcher.pending) == len(users)
            release.set()
            first.result()
            outcomes = []
            for call in calls:
                error = call.exception()
                outcomes.append((error.code(), error.details()) if error else call.result())
            assert batcher.batches == before + 2  # the first call, then the three together
    for user, outcome in zip(users, outcomes):
        assert isinstance(outcome, scoring_pb2.ScoreResponse), outcome
        np.testing.assert_allclose(outcome.scores, alone[user], atol=1e-5)


@pytest.mark.parametrize("limits,refusal", [
    ({"item_cache_entries": 50, "max_candidates": 60},
     "--item-cache-entries 50 is below --max-candidates 60: "),
    ({"item_cache_entries": 150, "max_candidates": 100},
     "--item-cache-entries 150 is below the store's history length 200 "),
])
def test_an_item_cache_smaller_than_one_call_is_refused_at_start(store_dir, model_root, limits, refusal):
    """One call's distinct items (its candidates, its user's history) must fit the item vector cache;
    a configuration where they cannot is refused at start, naming the flags, not failed call by call."""
    with pytest.raises(ValueError, match=refusal):
        with serving_in_background(ServeConfig(model_dir=str(model_root), port=0, **limits),
                                   open_store("local", store_dir)):
            pass


def test_the_model_queue_refuses_calls_past_its_row_bound_and_batches_what_waits():
    """A batcher of 300-row forwards and a 600-row queue, on an event loop: the calls submitted in one
    turn of the loop wait together; past the queue's bound they are refused at once, naming the flag;
    the admitted ones are scored in row-bounded batches, in order, a cancelled one is not scored and
    frees its room at once, one call's own failure fails it alone, and once the queue has drained it
    takes calls again."""
    from serving.batcher import ModelBatcher, Overloaded

    batches: list[list[str]] = []

    def score(model, requests):
        batches.append([name for name, _ in requests])
        return [ValueError(f"{name} failed") if name == "bad" else (model, name, rows) for name, rows in requests]

    async def scenario():
        batcher = ModelBatcher(score, max_rows=300, max_queued_rows=600)
        admitted, refused = [], []
        for name in ("a", "b", "c", "d"):  # one turn of the loop: none is scored yet
            try:
                admitted.append(batcher.submit("model-1", (name, 300), 300))
            except Overloaded as exc:
                refused.append(str(exc))
        assert len(admitted) == 2 and len(refused) == 2 and batcher.queued_rows == 600
        assert "600 rows wait for the model, a call of 300 more would pass the queue's 600 (--max-queued-rows)" \
            in refused[0]
        admitted[1].cancel()  # its caller gave up: its rows make room at once, not when its turn comes
        await asyncio.sleep(0)  # the model thread has taken "a"; "b" waits, cancelled
        assert batcher.queued_rows == 0 and len(batcher.pending) == 1
        admitted[1] = batcher.submit("model-1", ("b", 300), 300)
        assert await asyncio.gather(*admitted) == [("model-1", "a", 300), ("model-1", "b", 300)]
        assert batches == [["a"], ["b"]]  # 300 rows per forward: one call each
        assert batcher.queued_rows == 0
        batches.clear()
        small = [batcher.submit("model-1", (name, 100), 100) for name in ("e", "f", "bad", "g")]
        small[1].cancel()  # its caller left while it waited
        later = batcher.submit("model-2", ("h", 100), 100)  # a reload between admissions: its own forward
        outcomes = await asyncio.gather(*small, later, return_exceptions=True)
        assert batches == [["e", "bad", "g"], ["h"]]
        assert outcomes[0] == ("model-1", "e", 100) and isinstance(outcomes[1], asyncio.CancelledError)
        assert isinstance(outcomes[2], ValueError) and outcomes[3] == ("model-1", "g", 100)
        assert outcomes[4] == ("model-2", "h", 100) and batcher.queued_rows == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("limit,refusal", [
    ("concurrency", "Concurrent RPC limit exceeded!"),  # gRPC's own words
    ("queue", "server overloaded: 1000 rows wait for the model"),
    ("time", "server overloaded: a call of 500 rows would wait about "),
])
def test_a_flood_is_shed_and_admitted_calls_meet_their_deadline(store_dir, model_root, limit, refusal, caplog):
    """200 calls of 500 candidates at once, against 4 calls in the server at once, a model queue of
    1,000 rows, or a 25 ms wait for the model (each limit alone): some are refused RESOURCE_EXHAUSTED
    by that limit, the others succeed, every call ends well within its deadline, none fails INTERNAL
    or UNKNOWN, and the server is SERVING after. The shed calls are logged in summary lines, not one
    line each."""
    from collections import Counter

    from protos.plexrec.v1 import scoring_pb2

    limits = {"concurrency": {"max_concurrent_calls": 4, "max_queued_rows": 1_000_000, "max_queue_ms": None},
              "queue": {"max_concurrent_calls": None, "max_queued_rows": 1000, "max_queue_ms": None},
              "time": {"max_concurrent_calls": None, "max_queued_rows": 1_000_000, "max_queue_ms": 25}}[limit]
    config = ServeConfig(model_dir=str(model_root), port=0, max_batch_rows=1000, **limits)
    items, deadline = list(range(1, 501)), 5.0
    with caplog.at_level(logging.WARNING, logger="plexrec.serving"), \
            serving_in_background(config, open_store("local", store_dir)) as running:
        with ScoringClient(f"127.0.0.1:{running.port}") as scoring:
            scoring.score(USER, items)  # the items in the cache: the flood measures the server, not the store
            request = scoring_pb2.ScoreRequest(user_id=USER, item_ids=items)
            sent = time.monotonic()
            calls = [scoring.stub.Score.future(request, timeout=deadline) for _ in range(200)]
            outcomes = []
            for call in calls:
                error = call.exception()
                outcomes.append((error.code() if error else grpc.StatusCode.OK, error.details() if error else ""))
            took = time.monotonic() - sent
            codes = Counter(code for code, _ in outcomes)
            assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
            assert codes[grpc.StatusCode.OK] >= 2 and codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= 100, codes
            refusals = {details for code, details in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert any(details.startswith(refusal) for details in refusals), refusals
            assert all(details == "Concurrent RPC limit exceeded!" or
                       (details.startswith("server overloaded: ") and details.endswith("; retry with backoff"))
                       for details in refusals), refusals
            assert took < deadline / 2  # nobody waited for the deadline: refused at once, or scored
            assert scoring.serving()
            assert len(scoring.score(USER, items)[0]) == 500
    ours = [json.loads(r.getMessage()) for r in caplog.records if r.name == "plexrec.serving"]
    summaries = [line for line in ours if line["event"] == "calls_shed"]
    assert not [line for line in ours if line["event"] == "call_failed"]
    if limit != "concurrency":  # gRPC refuses those before the service sees them
        assert 1 <= len(summaries) <= 3, summaries
        assert sum(line["counts"].get("RESOURCE_EXHAUSTED", 0) for line in summaries) == \
            codes[grpc.StatusCode.RESOURCE_EXHAUSTED]


# --- another schema: KuaiRand-Pure (impressions, a 30-column user table, the request context `tab`) ---

KUAIRAND_HISTORY = 50  # the store's history length; KuaiRand's clicked histories are short


@pytest.fixture(scope="module")
def kuairand_slice(kuairand_tables):
    """KuaiRand of the users with id < 400 (their 3,260 impressions and profiles), every video. (Only
    these users' profiles: loading all 27,285 into the store took 35 s here, these 10 s.)"""
    users, interactions = kuairand_tables.users, kuairand_tables.interactions
    return DatasetTables(kuairand_tables.schema, interactions[interactions.user_id < 400].reset_index(drop=True),
                         users[users.user_id < 400].reset_index(drop=True), kuairand_tables.items)


@pytest.fixture(scope="module")
def kuairand_store(kuairand_slice, tmp_path_factory):
    directory = tmp_path_factory.mktemp("kuairand-store")
    load_into_store(open_store("local", directory), kuairand_slice, directory, history_length=KUAIRAND_HISTORY)
    return directory


def train_on(tables: DatasetTables, out: Path, mode: str, max_history: int) -> Path:
    """A small model of ``mode`` on every feature of the tables' schema, one epoch; its model dir."""
    config = small_config(epochs=1)
    config.features = []  # every feature of the schema
    config.sequence.mode, config.sequence.top_k, config.data.max_history = mode, 8, max_history
    examples = build_examples(tables.joined(), tables.schema)
    return Path(Trainer(config, examples=examples, out_dir=out).fit(progress=False)["model_dir"])


@pytest.fixture(scope="module")
def kuairand_model(kuairand_slice, tmp_path_factory):
    return train_on(kuairand_slice, tmp_path_factory.mktemp("kuairand-run"), "dare", KUAIRAND_HISTORY)


@pytest.fixture(scope="module")
def kuairand_server(kuairand_store, kuairand_model):
    config = ServeConfig(model_dir=str(kuairand_model), port=0)
    with serving_in_background(config, open_store("local", kuairand_store)) as running:
        yield running


def kuairand_request(tables: DatasetTables) -> tuple[int, list[int], int]:
    """The slice's user with the most clicks, some videos (one the catalogue does not know), a tab."""
    interactions = tables.interactions
    user = int(interactions[interactions.is_click == 1].user_id.value_counts().index[0])
    items = tables.items.video_id.drop_duplicates().head(7).astype(int).tolist() + [99_999_999]
    return user, items, int(interactions.tab.mode()[0])


def test_kuairand_server_scores_equal_the_offline_model(kuairand_server, kuairand_slice, kuairand_model):
    user, items, tab = kuairand_request(kuairand_slice)
    model = kuairand_server.watcher.current
    assert "tab" in model.input_features and model.shares_histories and model.schema.name == "kuairand-pure"
    with ScoringClient(f"127.0.0.1:{kuairand_server.port}") as scoring:
        scores, _ = scoring.score(user, items, context={"tab": str(tab)})
        zero, _ = scoring.score(0, items[:3], context={"tab": str(tab)})  # user 0 is a KuaiRand user
    np.testing.assert_allclose(scores, offline_scores(kuairand_slice, kuairand_model, user, items, {"tab": tab}),
                               atol=1e-5)
    np.testing.assert_allclose(zero, offline_scores(kuairand_slice, kuairand_model, 0, items[:3], {"tab": tab}),
                               atol=1e-5)
    assert np.ptp(scores) > 1e-3


def test_the_context_is_a_model_input(kuairand_server, kuairand_slice, kuairand_model):
    user, items, tab = kuairand_request(kuairand_slice)
    other = int(next(t for t in kuairand_slice.interactions.tab.unique() if t != tab))
    with ScoringClient(f"127.0.0.1:{kuairand_server.port}") as scoring:
        on_tab, _ = scoring.score(user, items, context={"tab": str(tab)})
        on_other, _ = scoring.score(user, items, context={"tab": str(other), "not_a_feature": "ignored"})
        without, _ = scoring.score(user, items)  # a declared context feature left out: no value
        ranked = scoring.rank(user, items, k=3, context={"tab": str(other)})
    assert np.abs(np.array(on_tab) - np.array(on_other)).max() > 1e-4
    np.testing.assert_allclose(on_other, offline_scores(kuairand_slice, kuairand_model, user, items,
                                                        {"tab": other}), atol=1e-5)
    np.testing.assert_allclose(without, offline_scores(kuairand_slice, kuairand_model, user, items), atol=1e-5)
    assert [item for item, _ in ranked] == [items[i] for i in np.argsort(-np.array(on_other), kind="stable")[:3]]
    done = subprocess.run([sys.executable, "-m", "plexrec.cli", "score", "--target",
                           f"127.0.0.1:{kuairand_server.port}", "--user", str(user), "--items",
                           ",".join(map(str, items[:2])), "--context", f"tab={other}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose([float(line.split()[1]) for line in done.stdout.splitlines()[1:3]], on_other[:2],
                               atol=1e-4)


def test_a_model_of_another_schema_is_refused_naming_the_differences(kuairand_store, model_root):
    """The ML-100K model against the KuaiRand store: it would read columns the store does not hold."""
    with pytest.raises(ModelArtifactError, match=r"trained on schema ml-100k, the store holds kuairand-pure: "
                                                 r".*items\.categorical: \['release_year'\] != \['author_id'"):
        with serving_in_background(ServeConfig(model_dir=str(model_root), port=0),
                                   open_store("local", kuairand_store)):
            pass


def test_a_model_without_a_schema_is_refused(store_dir, model_root, tmp_path):
    old = with_version(next(model_root.iterdir()), tmp_path, "20200101T000000-old")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["schema"] = manifest["schema_fingerprint"] = None  # as exported before schemas existed
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelArtifactError, match="records no data set schema.*export it again"):
        load_serving_model(old, read_store_meta(store_dir))


# --- a tiny generated data set with a numeric context feature (KuaiRand has none) ---

TINY = DatasetSchema(
    # (a path is never read here: the tables come from a frame; DatasetSchema.from_dict, which reads
    # store.json and the manifest, requires one)
    name="tiny-context", path="generated.parquet", user="uid", item="iid", timestamp="ts", label="clicked",
    users=FeatureGroup(categorical=["country"]),
    items=FeatureGroup(multi_valued={"tags": "|"}, numeric=["price"]),
    context=FeatureGroup(categorical=["device"], numeric=["hour"]), category="tags")
TINY_HISTORY = 20


@pytest.fixture(scope="module")
def tiny_tables():
    """40 users (ids from 0) x 30 items, 1,200 interactions; some prices and hours missing."""
    rng = np.random.default_rng(0)
    n = 1200
    uid, iid = rng.integers(0, 40, n), rng.integers(0, 30, n)
    hour = rng.integers(0, 24, n).astype(float)
    hour[rng.random(n) < 0.1] = np.nan
    device = rng.choice(["ios", "android", "web"], n)
    frame = pd.DataFrame({
        "uid": uid, "iid": iid, "ts": rng.integers(1_000_000, 1_100_000, n),
        "clicked": ((hour > 12) ^ (device == "ios") ^ (rng.random(n) < 0.2)).astype(int),
        "country": [f"c{u % 3}" for u in uid], "tags": [f"t{i % 5}|t{(i + 1) % 5}" for i in iid],
        "price": np.where(iid % 7 == 0, np.nan, iid * 1.5), "device": device, "hour": hour})
    return tables_from_frame(frame, TINY)


@pytest.fixture(scope="module")
def tiny_store(tiny_tables, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-store")
    load_into_store(open_store("local", directory), tiny_tables, directory, history_length=TINY_HISTORY)
    return directory


def test_numeric_context_is_parsed_checked_and_scored(tiny_tables, tiny_store, tmp_path):
    model_dir = train_on(tiny_tables, tmp_path, "mean", TINY_HISTORY)
    items = [0, 3, 7, 12, 29, 500]  # 0 and 7: no price; 500: an unknown item
    config = ServeConfig(model_dir=str(model_dir), port=0)
    with serving_in_background(config, open_store("local", tiny_store)) as running:
        assert running.watcher.current.manifest["dense_features"][-2:] == ["price", "hour"]
        with ScoringClient(f"127.0.0.1:{running.port}") as scoring:
            morning, _ = scoring.score(0, items, context={"device": "ios", "hour": "7"})
            evening, _ = scoring.score(0, items, context={"device": "ios", "hour": "21.5"})
            nothing, _ = scoring.score(0, items)  # no context: device an empty bag, hour missing (0)
            for bad in ("noon", "nan"):
                with pytest.raises(grpc.RpcError) as error:
                    scoring.score(0, items, context={"device": "ios", "hour": bad})
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert error.value.details().startswith("context.hour: ")
    assert np.abs(np.array(morning) - np.array(evening)).max() > 1e-4
    for scores, context in ((morning, {"device": "ios", "hour": 7.0}), (evening, {"device": "ios", "hour": 21.5}),
                            (nothing, {})):
        np.testing.assert_allclose(scores, offline_scores(tiny_tables, model_dir, 0, items, context), atol=1e-5)


def test_request_context_takes_the_schemas_context_features():
    assert request_context(TINY, {"device": "web", "hour": "3", "other": "x", "country": "c1"}) == \
        {"device": "web", "hour": 3.0}  # country is a user feature: it comes from the store, not the caller
    assert request_context(TINY, {"hour": ""}) == {}
    with pytest.raises(InvalidContext, match="context.hour: is a numeric feature; 'inf' is not a finite number"):
        request_context(TINY, {"hour": "inf"})


def test_a_model_reading_a_longer_history_than_the_store_keeps_is_refused(tiny_tables, tiny_store, tmp_path):
    """The store keeps 20 behaviours per user (store.json; the ingester keeps no other length,
    tests/test_ingest.py): a model reading 30 is refused by load_serving_model and by the server,
    which does not start with it."""
    model_dir = train_on(tiny_tables, tmp_path, "mean", TINY_HISTORY + 10)
    refusal = r"reads the last 30 behaviours \(data.max_history\) but the store keeps 20 per user"
    with pytest.raises(ModelArtifactError, match=refusal):
        load_serving_model(model_dir, read_store_meta(tiny_store))
    with pytest.raises(ModelArtifactError, match=refusal):
        with serving_in_background(ServeConfig(model_dir=str(model_dir), port=0), open_store("local", tiny_store)):
            pass


def test_new_events_through_kafka_change_the_users_scores(broker, server, client, store_dir):
    """Freshness end to end: events on Kafka -> the ingester -> the online store -> different scores.
    (Last in this file: it changes user 7's history and the counts of items 1201-1230.)"""
    from features.events import EventProducer, make_event
    from features.ingest import Ingester
    from features.online import OnlineFeatures
    from protos.plexrec.v1.events_pb2 import EventType

    user, candidates = 7, list(range(500, 521))
    before, _ = client.score(user, candidates)
    others_before, _ = client.score(USER, candidates)
    new_items = list(range(1201, 1231))
    topic = f"freshness-{time.time_ns()}"
    producer = EventProducer(broker, topic)
    producer.send_all(make_event(user_id=user, item_id=item, event_type=EventType.EVENT_TYPE_RATING, value=5.0)
                      for item in new_items)
    producer.close()
    store = open_store("local", store_dir)
    ingester = Ingester(broker, store, store_dir, topic=topic, group=topic)
    ingester.run(stop_after_idle_seconds=3)
    ingester.close()
    assert OnlineFeatures(store).user(user).history_item_ids[-30:] == new_items
    after, _ = client.score(user, candidates)
    assert np.abs(np.array(after) - np.array(before)).max() > 1e-3
    others_after, _ = client.score(USER, candidates)  # another user's scores did not move with user 7's events
    np.testing.assert_allclose(others_after, others_before, atol=1e-6)
