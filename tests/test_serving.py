"""The gRPC scoring server on loopback: real trained models, real local Feast stores.

ML-100K (most tests), a slice of KuaiRand-Pure (another schema: impressions, a user
table of 30 columns, the request context `tab`, user id 0), and a tiny generated
data set with a numeric context feature. The reference for every score is the
exported model on examples of the *direct* loader (build_examples on the joined
frame), not the store."""

from __future__ import annotations

import json
import logging
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
from recsys.data.examples import build_examples
from recsys.data.schema import DatasetSchema, FeatureGroup
from recsys.data.tables import DatasetTables, tables_from_frame
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
    config = ServeConfig(model_dir=str(model_root), port=0, metrics_port=0)
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
    per_row = model.probabilities(model_batch(model.schema, requests, history, model.input_features,
                                              model.history_length, share_histories=False))
    np.testing.assert_allclose(together, per_row, atol=1e-6)


def test_concurrent_calls_share_forwards_and_get_their_own_scores(server):
    users, items = [USER, 2, 3, 5, 6, 10, 13, 15], list(range(1, 301))
    with ScoringClient(f"127.0.0.1:{server.port}") as alone:
        expected = {u: alone.score(u, items)[0] for u in users}
    failures = []

    def call(user: int) -> None:  # (an exception in a thread would go unseen: failures are collected)
        with ScoringClient(f"127.0.0.1:{server.port}") as scoring:
            for _ in range(5):
                try:
                    scores, _ = scoring.score(user, items)
                except grpc.RpcError as exc:
                    failures.append((user, exc.code(), exc.details()))
                    continue
                if not np.allclose(scores, expected[user], atol=1e-5):
                    failures.append((user, "wrong scores"))

    def impatient() -> None:  # calls whose deadline passes mid-flight: they must not fail the others
        with ScoringClient(f"127.0.0.1:{server.port}", timeout=0.01) as scoring:
            for _ in range(10):
                try:
                    scoring.score(USER, list(range(1, 1001)))
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
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
    done = subprocess.run([sys.executable, "-m", "recsys.cli", "score", "--target", f"127.0.0.1:{server.port}",
                           "--user", str(USER), "--items", "50,181"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    scores, _ = client.score(USER, [50, 181])
    printed = [float(line.split()[1]) for line in done.stdout.splitlines()[1:3]]
    np.testing.assert_allclose(printed, scores, atol=1e-4)
    bad = subprocess.run([sys.executable, "-m", "recsys.cli", "score", "--target", f"127.0.0.1:{server.port}",
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
    first = with_version(next(model_root.iterdir()), root, "20200101T000000-first")
    config = ServeConfig(model_dir=str(root), port=0, reload_seconds=0.2)
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
            broken = with_version(first, root, "20300101T000000-broken")
            (broken / "weights.safetensors").write_bytes(b"not a tensor file")
            deadline = time.monotonic() + 30
            while "20300101T000000-broken" not in running.watcher.refused and time.monotonic() < deadline:
                time.sleep(0.1)
            with_version(first, root, "20400101T000000-second")
            while running.watcher.current.version != "20400101T000000-second" and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
        stop.set()
        for caller in callers:
            caller.join()
    assert not failures, failures[:3]
    assert "refused model 20300101T000000-broken" in caplog.text
    assert versions[0] == "20200101T000000-first" and versions[-1] == "20400101T000000-second"
    assert "20300101T000000-broken" not in versions
    switch = versions.index("20400101T000000-second")
    assert len(versions) > 20 and switch > 0


def test_a_refused_version_is_retried_only_once_its_files_change(store_dir, model_root, tmp_path, caplog):
    from serving.model import ModelWatcher

    root = tmp_path / "models"
    first = with_version(next(model_root.iterdir()), root, "20200101T000000-first")
    watcher = ModelWatcher(root, read_store_meta(store_dir))
    late = with_version(first, root, "20300101T000000-late")
    good_weights = (late / "weights.safetensors").read_bytes()
    (late / "weights.safetensors").write_bytes(good_weights[:100])  # a copy still in progress
    with caplog.at_level(logging.ERROR, logger="plexrec.serving.model"):
        assert not watcher.check() and not watcher.check()
    assert caplog.text.count("refused model 20300101T000000-late") == 1  # not retried while unchanged
    (late / "weights.safetensors").write_bytes(good_weights)  # the copy completes
    assert watcher.check() and watcher.current.version == "20300101T000000-late"


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
    done = subprocess.run([sys.executable, "-m", "recsys.cli", "score", "--target",
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
    model_dir = train_on(tiny_tables, tmp_path, "mean", TINY_HISTORY + 10)
    with pytest.raises(ModelArtifactError, match=r"reads the last 30 behaviours \(data.max_history\) but the "
                                                 r"store keeps 20 per user"):
        load_serving_model(model_dir, read_store_meta(tiny_store))


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
