"""What the gRPC server scores is what the served model computes on the same online features, also
after the stream changed an item (issue 21 item 3): the real ingester, the real learner (compaction,
its window, export and publish) and the real server on loopback. The reference is the exported
TorchRec Ranker on training's rows (serving/inputs.py ``model_batch``) built from the features the
online store holds at the call."""

from __future__ import annotations

import numpy as np

from features.events import schema_events
from features.online import OnlineFeatures
from features.store import open_store
from serving.client import ScoringClient
from serving.server import ServeConfig, serving_in_background
from tests.test_event_log import stream
from tests.test_learn import HISTORY, trained_on_the_past  # noqa: F401 (a fixture)

DOCUMENTARY = {"genres": "Documentary"}


def model_scores(model, online: OnlineFeatures, user_id: int, items: list[int]) -> np.ndarray:
    """The served version's exported model (eager TorchRec path) on what the online store holds now."""
    user = online.user(user_id)
    candidates = online.items(items)
    history = online.items(user.history_item_ids[-model.history_length:]) if model.history_length else {}
    return model.eager_probabilities(model.eager_batch([(user, [candidates[i] for i in items])], history))


def recently_rated(future, schema) -> tuple[int, list[int]]:
    """The item in the most of the future's users' last HISTORY / 2 ratings (ties: the smallest id),
    and 3 of those users: it is then in the history the store keeps of each (the last HISTORY), with
    room for equal timestamps at the edge. (``value_counts().index[0]`` over all future ratings left
    the choice among 3 items of 11 ratings to an unstable sort, and on 2026-12-04 it chose one that a
    rater had rated 378 ratings before the end: not in that rater's history at all.)"""
    ordered = future.sort_values(schema.timestamp, kind="stable")
    recent = ordered.groupby(schema.user, sort=True).tail(HISTORY // 2)
    counts = recent.groupby(schema.item)[schema.user].nunique()
    item = int(counts[counts == counts.max()].index.min())
    raters = recent.loc[recent[schema.item] == item, schema.user].drop_duplicates().astype(int).tolist()
    assert len(raters) >= 3
    return item, sorted(raters)[:3]


def test_after_a_streamed_attribute_change_and_a_learner_export_served_scores_are_the_models(
        broker, trained_on_the_past, ml100k_tables):  # noqa: F811
    """An event moves an item to another category (online at once, offline through the event log);
    the learner learns the stream, exports and publishes. The server of that version scores users
    who rated the item (it is a candidate and in their histories) as the model does on the same
    online features, to 1e-5; vectors published under the served version's name (here: junk) change
    nothing, since serving computes every item's vectors from the model and the online profile."""
    from features.event_log import item_profiles
    from features.publish import publish_item_embeddings
    from recsys.learn import LearnConfig, StreamLearner

    store, store_dir, models, future = trained_on_the_past
    schema = ml100k_tables.schema
    events = schema_events(future, schema)
    item, raters = recently_rated(future, schema)
    first = min(e.event_time_ms for e in events if e.item_id == item)
    next(e for e in events if e.item_id == item and e.event_time_ms == first).item_attributes.update(DOCUMENTARY)
    old_category = item_profiles(store_dir).set_index("item_id").loc[item, "item_category"]
    assert old_category != "Documentary"
    stream(broker, store, store_dir, events, max_batch=200)

    learner = StreamLearner(LearnConfig(model_dir=str(models), data_dir=str(store_dir), export_events=10**9,
                                        export_seconds=10**9))
    assert learner.step() > 0
    version = learner.export()
    assert learner.stats.published > 0
    online = OnlineFeatures(store)
    assert online.items([item])[item].category == "Documentary"  # what the server reads
    # what the learner trained on and published from: the same profile
    assert item_profiles(store_dir).set_index("item_id").loc[item, "item_category"] == "Documentary"

    others = [i for i in future[schema.item].drop_duplicates().astype(int).tolist() if i != item][:30]
    candidates = [item, *others, 10**9]  # an item nobody knows: cold start
    config = ServeConfig(model_dir=str(models), port=0, item_cache_seconds=0.0)  # every call reads the store
    with serving_in_background(config, open_store("local", store_dir)) as running, \
            ScoringClient(f"127.0.0.1:{running.port}") as scoring:
        model = running.watcher.current
        assert model.version == version.name

        def served_and_model() -> list[tuple[np.ndarray, np.ndarray]]:
            pairs = []
            for user in raters:
                assert item in online.user(user).history_item_ids[-model.history_length:]
                scores, served_version = scoring.score(user, candidates)
                assert served_version == version.name
                pairs.append((np.array(scores), model_scores(model, online, user, candidates)))
            return pairs

        pairs = served_and_model()
        for served, reference in pairs:
            np.testing.assert_allclose(served, reference, rtol=0, atol=1e-5)
            assert np.ptp(served) > 1e-3  # the items are told apart, not one constant

        ids = np.array(candidates[:-1])
        _, attention, representation = model.inputs.item_vectors.parts  # DARE: both kept
        publish_item_embeddings(store, ids, np.full((len(ids), representation.shape[1]), 5.0),
                                np.full((len(ids), attention.shape[1]), -5.0), version.name, store_dir)
        for (before, _), (after, reference) in zip(pairs, served_and_model()):
            np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
            np.testing.assert_allclose(after, reference, rtol=0, atol=1e-5)
