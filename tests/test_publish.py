"""Published item embeddings (features/publish.py) against real local Feast stores: one file per
model version holding only the items whose vectors changed, written atomically, repaired after a
kill, pruned with the learner's versions; Feast's DuckDB offline store (materialize, point-in-time
reads) and the online read API see every item's newest vectors, and count an item a version left
alone as that version's own. The scoring server reads none (tests/test_served_scores.py)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from features.online import OnlineFeatures
from features.publish import publish_item_embeddings
from features.store import open_store
from tests.test_ingest import empty_store, movielens_catalogue  # noqa: F401 (fixtures)
from tests.test_learn import trained_on_the_past  # noqa: F401 (a fixture)

ITEMS = np.arange(1, 1683, dtype=np.int64)  # MovieLens' catalogue


def vectors(seed: int, count: int = len(ITEMS)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, 24)).astype(np.float32), rng.normal(size=(count, 16)).astype(np.float32)


def embeddings_dir(directory):
    return directory / "offline" / "item_embeddings"


def online_rows(store, items) -> dict[int, tuple[str, list[float]]]:
    read = store.get_online_features(
        features=["item_embeddings:model_version", "item_embeddings:representation_embedding"],
        entity_rows=[{"item_id": int(i)} for i in items]).to_dict()
    return {int(i): (v, r) for i, v, r in zip(read["item_id"], read["model_version"], read["representation_embedding"])}


def files(directory) -> list[str]:
    return sorted(p.name for p in embeddings_dir(directory).iterdir() if not p.name.startswith(".publish"))


def materialize(store) -> None:
    store.materialize(start_date=datetime(1970, 1, 2, tzinfo=timezone.utc),
                      end_date=datetime.now(timezone.utc) + timedelta(days=1), feature_views=["item_embeddings"])


def test_a_publish_writes_only_the_changed_items_into_its_versions_file_and_feast_reads_the_newest(
        empty_store):  # noqa: F811
    store, directory = empty_store
    representation, attention = vectors(0)
    assert publish_item_embeddings(store, ITEMS, representation, attention, "v1", directory) == len(ITEMS)
    changed = ITEMS[:25]
    second = representation.copy()
    second[:25] += 0.5
    second[25:30] += 1e-8  # within the tolerance: unchanged
    assert publish_item_embeddings(store, ITEMS, second, attention, "v2", directory) == 25
    assert publish_item_embeddings(store, ITEMS, second, attention, "v3", directory) == 0
    assert files(directory) == ["v1.parquet", "v2.parquet", "v3.parquet"]
    by_file = {name: pd.read_parquet(embeddings_dir(directory) / name) for name in files(directory)}
    assert len(by_file["v1.parquet"]) == len(ITEMS) and sorted(by_file["v2.parquet"].item_id) == changed.tolist()
    assert len(by_file["v3.parquet"]) == 0  # v3's publish is complete: its (empty) file says so

    online = online_rows(store, [1, 25, 26, 1682])
    assert [online[i][0] for i in (1, 25, 26, 1682)] == ["v2", "v2", "v1", "v1"]
    np.testing.assert_allclose(online[1][1], second[0], rtol=0, atol=1e-6)

    # Feast's DuckDB offline store reads the glob: point in time and materialize take the newest row
    stamps = {name: frame.event_timestamp.iloc[0] for name, frame in by_file.items() if len(frame)}
    entities = pd.DataFrame({"item_id": [1, 1, 26], "event_timestamp": [
        stamps["v1.parquet"] + timedelta(microseconds=1), stamps["v2.parquet"] + timedelta(seconds=1),
        stamps["v2.parquet"] + timedelta(seconds=1)]})
    joined = store.get_historical_features(entity_df=entities, features=["item_embeddings:model_version"]).to_df()
    got = {(int(r.item_id), pd.Timestamp(r.event_timestamp)): r.model_version for r in joined.itertuples()}
    assert [got[(i, t)] for i, t in zip(entities.item_id, entities.event_timestamp)] == ["v1", "v2", "v1"]
    junk = pd.DataFrame({"item_id": [1, 26], "attention_embedding": [[0.0], [0.0]],
                         "representation_embedding": [[0.0], [0.0]], "model_version": ["junk", "junk"],
                         "event_timestamp": pd.Timestamp("2000-01-01", tz="UTC")})
    store.write_to_online_store("item_embeddings", junk)
    materialize(store)
    assert [online_rows(store, [1, 26])[i][0] for i in (1, 26)] == ["v2", "v1"]

    # serving's rule: v1's rows are v3's own (v3's publish left them alone); v2's rows are not v1's
    from features.publish import PublishedVersions

    published = PublishedVersions(directory)
    assert published.valid_for("v1", "v3") and published.valid_for("v2", "v3") and published.valid_for("v3", "v3")
    assert not published.valid_for("v2", "v1") and not published.valid_for("junk", "v3")


def test_a_kill_during_a_publish_breaks_neither_the_next_publish_nor_feast(empty_store, caplog):  # noqa: F811
    """What a kill can leave: the 0-byte offline/item_embeddings.parquet of the single-file layout
    (every later publish raised ArrowInvalid, also after a restart), a half-written temp file, a
    publish killed between its file and its online rows (.pending), and a damaged version file.
    The next publish repairs each, and Feast reads the files."""
    store, directory = empty_store

    representation, attention = vectors(1)
    legacy = directory / "offline" / "item_embeddings.parquet"
    legacy.write_bytes(b"")  # the old layout's rewrite, killed
    with caplog.at_level("WARNING", logger="plexrec.features"):
        assert publish_item_embeddings(store, ITEMS, representation, attention, "v1", directory) == len(ITEMS)
    assert "unreadable" in caplog.text and not legacy.exists()
    folder = embeddings_dir(directory)
    second = representation.copy()
    second[100:110] -= 1.0
    publish_item_embeddings(store, ITEMS, second, attention, "v2", directory)
    third = second.copy()
    third[:40] += 1.0
    publish_item_embeddings(store, ITEMS, third, attention, "v3", directory)
    # v2's file damaged (a disk's doing: files are renamed into place whole)
    (folder / "v2.parquet").write_bytes(b"PAR1 damaged")
    # v3's publish killed after its file, before its online rows
    (folder / "v3.parquet").rename(folder / "v3.parquet.pending")
    store.write_to_online_store("item_embeddings", pd.DataFrame({
        "item_id": ITEMS[:40], "attention_embedding": list(attention[:40]),
        "representation_embedding": list(representation[:40]), "model_version": "v1",
        "event_timestamp": pd.Timestamp.now(tz="UTC")}))
    from features.publish import PublishedVersions

    assert not PublishedVersions(directory).valid_for("v1", "v3")  # v3's publish is not complete
    # a publish of v4 killed while writing its file: a truncated temp file
    (folder / ".v4.parquet.tmp").write_bytes((folder / "v1.parquet").read_bytes()[:1000])

    caplog.clear()
    with caplog.at_level("INFO", logger="plexrec.features"):
        written = publish_item_embeddings(store, ITEMS, third, attention, "v5", directory)
    assert written == 10  # v2's items again (its file was lost); v3's completed, not republished
    assert "completed the publish of v3.parquet" in caplog.text and "v2.parquet is unreadable" in caplog.text
    assert files(directory) == ["v1.parquet", "v2.parquet.damaged", "v3.parquet", "v5.parquet"]
    online = online_rows(store, [1, 40, 41, 101])
    assert [online[i][0] for i in (1, 40, 41, 101)] == ["v3", "v3", "v1", "v5"]
    np.testing.assert_allclose(online[1][1], third[0], rtol=0, atol=1e-6)
    materialize(store)  # DuckDB reads every file of the glob
    assert [online_rows(store, [1, 41, 101])[i][0] for i in (1, 41, 101)] == ["v3", "v1", "v5"]


def test_pruning_removes_the_files_of_removed_versions_and_keeps_every_items_newest_vectors(
        empty_store):  # noqa: F811
    from features.publish import PublishedEmbeddings, PublishedVersions, prune_item_embeddings

    store, directory = empty_store
    representation, attention = vectors(2)
    state = PublishedEmbeddings()
    versions, expected = [], representation.copy()
    for step in range(8):
        if step:
            expected[step * 50:step * 50 + 50] += 1.0  # 50 items change per version
        name = f"v{step}"
        publish_item_embeddings(store, ITEMS, expected, attention, name, directory, state=state)
        versions.append(name)
        if len(versions) > 3:  # keep the newest 3, as the learner's --keep-versions
            assert prune_item_embeddings(store, versions[:-3], directory, state=state) == len(versions) - 3
            versions = versions[-3:]
    kept = [n for n in files(directory) if not n.startswith("carried-")]
    assert kept == [f"{v}.parquet" for v in versions]
    carried = [n for n in files(directory) if n.startswith("carried-")]
    assert 1 <= len(carried) <= 3  # merged by size: not one per prune
    newest = pd.concat([pd.read_parquet(embeddings_dir(directory) / n) for n in files(directory)])
    newest = newest.sort_values("event_timestamp").groupby("item_id").last()
    assert len(newest) == len(ITEMS)
    np.testing.assert_allclose(np.stack(newest.loc[ITEMS, "representation_embedding"]), expected, atol=1e-6)
    # v0's rows (items no later version changed) were carried: still the newest, and the newest version's own
    assert (newest.loc[ITEMS[400:], "model_version"] == "v0").all()
    assert PublishedVersions(directory).valid_for("v0", versions[-1])
    # a reader that never saw the files agrees with the caller's state: nothing to publish
    assert publish_item_embeddings(store, ITEMS, expected, attention, "v8", directory) == 0
    materialize(store)
    online = OnlineFeatures(store)
    online.use_model_version("v8")
    items = online.items([1, 60, 351, 1682])
    assert [items[i].model_version for i in (1, 60, 351, 1682)] == ["v0", "v1", "v7", "v0"]
    assert {item.embeddings_valid_for for item in items.values()} == {"v8"}


def test_a_version_name_that_is_not_a_file_name_is_refused(empty_store):  # noqa: F811
    store, directory = empty_store
    representation, attention = vectors(3, 2)
    for bad in ("../x", ".hidden", "carried-1", ""):
        with pytest.raises(ValueError, match="cannot name a file"):
            publish_item_embeddings(store, ITEMS[:2], representation, attention, bad, directory)
    assert not os.path.exists(embeddings_dir(directory)) or files(directory) == []


def test_the_learner_publishes_only_what_changed_and_prunes_with_its_versions(
        broker, trained_on_the_past, ml100k_tables):
    """plexrec learn over a store whose single-file layout a kill left at 0 bytes: its first export
    publishes the catalogue, the next only the items whose vectors changed (what an independent
    comparison of the two versions finds), a restarted learner none for the same model; versions
    beyond --keep-versions take their files with them, every item keeps its newest vectors (valid for
    the newest version, which republished nothing), and a server of the newest version reads none of
    them: it computes every item's vectors from the model and the online profile."""
    from features.events import schema_events
    from recsys.export import load_model
    from recsys.item_embeddings import catalogue_embeddings
    from recsys.learn import LearnConfig, StreamLearner
    from serving.client import ScoringClient
    from serving.server import ServeConfig, serving_in_background
    from tests.test_event_log import stream

    store, store_dir, models, future = trained_on_the_past
    events = schema_events(future, ml100k_tables.schema)
    (store_dir / "offline" / "item_embeddings.parquet").write_bytes(b"")  # the old layout's killed rewrite
    config = LearnConfig(model_dir=str(models), data_dir=str(store_dir), export_events=10**9, export_seconds=10**9,
                         keep_versions=2)
    learner = StreamLearner(config)
    stream(broker, store, store_dir, events[:-3], max_batch=200)
    assert learner.step()
    first = learner.export()
    assert learner.stats.published == 1682  # nothing was published before: the whole catalogue
    stream(broker, store, store_dir, events[-3:], max_batch=200)  # 3 events: shared rows, some items change
    assert learner.step() == 3
    second = learner.export()
    (ids, r1, a1), (_, r2, a2) = [catalogue_embeddings(load_model(v)[0], store_dir) for v in (first, second)]
    differ = ~(np.isclose(r1, r2, rtol=0, atol=1e-7).all(axis=1) & np.isclose(a1, a2, rtol=0, atol=1e-7).all(axis=1))
    written = pd.read_parquet(embeddings_dir(store_dir) / f"{second.name}.parquet")
    assert 0 < differ.sum() < 1682 and learner.stats.published == 1682 + differ.sum()
    assert sorted(written.item_id) == sorted(ids[differ])

    # restarted (its state read from the files; a kill left a half-written temp file): nothing to publish
    (embeddings_dir(store_dir) / f".{second.name}.parquet.tmp").write_bytes(b"PAR1")
    assert StreamLearner(config)._publish(second) == 0

    # two more versions, nothing learned: the two first are pruned, files included
    newest = None
    for _ in range(2):
        learner._unexported = 1
        newest = learner.export()
    names = sorted(p.name for p in embeddings_dir(store_dir).glob("*.parquet"))
    assert f"{first.name}.parquet" not in names and f"{second.name}.parquet" not in names
    assert [n for n in names if not n.startswith("carried-")] == sorted(
        f"{v.name}.parquet" for v in (learner.models / learner.stats.versions[-2], newest))
    rows = pd.concat([pd.read_parquet(embeddings_dir(store_dir) / n) for n in names])
    rows = rows.sort_values("event_timestamp").groupby("item_id").last().loc[ids]
    np.testing.assert_allclose(np.stack(rows.representation_embedding), r2, rtol=0, atol=1e-7)
    assert set(rows.model_version) == {first.name, second.name}
    from features.publish import PublishedVersions

    assert all(PublishedVersions(store_dir).valid_for(v, newest.name) for v in (first.name, second.name))

    items = list(range(1, 41))
    serve = ServeConfig(model_dir=str(models), port=0, item_cache_seconds=0.0)
    with serving_in_background(serve, open_store("local", store_dir)) as running, \
            ScoringClient(f"127.0.0.1:{running.port}") as scoring:
        assert running.watcher.current.version == newest.name
        _, version = scoring.score(1, items)
    assert version == newest.name
