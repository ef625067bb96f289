"""The ingester's folds on plain values: every effectively-once rule without Kafka or a store
(tests/test_ingest.py runs the same rules end to end on the embedded broker)."""

from features.events import NOT_CARRIED, make_event
from features.folds import (ItemCounterRow, ItemDelta, Received, UserRow, event_key, fold_item_attributes,
                            fold_item_counters, fold_user, unpack_window)

SOURCE = "user-events@abc"


def received(offset, item, seconds, event_id=None, label=1, behaviour=True, partition=0):
    event = make_event(7, item, event_time_ms=seconds * 1000, event_id=event_id or f"e{offset}", label=label)
    return Received(partition, offset, event, label, behaviour)


def user_fold(row, events, history_length=3, dedupe_window=10):
    return fold_user(row, events, incarnation=SOURCE, history_length=history_length, dedupe_window=dedupe_window,
                     units_per_second=1)


def test_a_users_behaviours_merge_by_time_and_are_cut_to_the_history_length():
    row = UserRow(history_item_ids=[10, 11], history_timestamps=[100, 300], interaction_count=2)
    fold = user_fold(row, [received(5, 12, 200), received(6, 13, 300), received(4, 14, 50)])
    # by time; among equal times (300) the stored behaviour first; the oldest two cut away
    assert fold.row.history_item_ids == [12, 11, 13]
    assert fold.row.history_timestamps == [200, 300, 300]
    assert fold.row.interaction_count == 5 and fold.applied == 3
    assert (fold.row.ingest_source, fold.row.ingest_offset) == (f"{SOURCE}/0", 6)
    assert len(unpack_window(fold.row.recent_event_ids)) == 3


def test_events_at_or_below_the_watermark_change_nothing():
    row = UserRow(history_item_ids=[10], history_timestamps=[100], interaction_count=1,
                  ingest_source=f"{SOURCE}/0", ingest_offset=5)
    fold = user_fold(row, [received(4, 12, 200), received(5, 13, 200)])
    assert fold.row is None and fold.skipped_duplicates == 2 and fold.duplicate_event_ids == 0
    # the same offsets of another partition, or of a recreated topic, are new events
    other = user_fold(row, [received(4, 12, 200, partition=1)])
    assert other.row.history_item_ids == [10, 12]
    recreated = fold_user(row, [received(4, 12, 200)], incarnation="user-events@new", history_length=3,
                          dedupe_window=10, units_per_second=1)
    assert recreated.row.history_item_ids == [10, 12]


def test_an_event_id_seen_before_is_skipped_and_one_with_another_label_is_dropped():
    first = user_fold(UserRow(), [received(0, 12, 200, event_id="a"), received(1, 13, 201, event_id="a")])
    assert first.row.history_item_ids == [12] and first.duplicate_event_ids == 1
    retry = user_fold(first.row, [received(2, 12, 200, event_id="a")])  # a producer's retry at a new offset
    assert retry.row is None and retry.duplicate_event_ids == 1
    relabelled = received(3, 12, 200, event_id="a", label=0, behaviour=False)
    conflict = user_fold(first.row, [relabelled, received(4, 14, 300, event_id="b")])
    assert conflict.conflicts == [(relabelled, 1)]
    assert conflict.row.history_item_ids == [12, 14] and conflict.row.ingest_offset == 4


def test_an_event_that_is_no_behaviour_enters_the_window_only():
    fold = user_fold(UserRow(), [received(0, 12, 200, label=0, behaviour=False)])
    assert fold.row.history_item_ids == [] and fold.row.interaction_count == 0 and fold.applied == 0
    assert unpack_window(fold.row.recent_event_ids) == [event_key("e0") & ~1]  # its label in the lowest bit


def test_the_window_keeps_the_newest_ids_only():
    fold = user_fold(UserRow(), [received(n, 12, 200 + n) for n in range(5)], dedupe_window=2)
    assert unpack_window(fold.row.recent_event_ids) == [event_key("e3") | 1, event_key("e4") | 1]
    again = user_fold(fold.row, [received(9, 12, 300, event_id="e0")], dedupe_window=2)
    assert again.row.history_item_ids[-1] == 12 and again.applied == 1  # forgotten: counted again


def delta(offset, event_id, partition=0, source=SOURCE, seconds=100, attributes=None, category=NOT_CARRIED):
    event = make_event(7, 12, event_time_ms=seconds * 1000, event_id=event_id, item_attributes=attributes)
    return ItemDelta(source, partition, offset, event, True, dict(attributes or {}), category)


def test_an_items_counters_count_each_offset_and_event_id_once():
    row, skipped = fold_item_counters(ItemCounterRow(), [delta(3, "a"), delta(1, "b", partition=2), delta(4, "a")],
                                      dedupe_window=10)
    assert row.interaction_count == 2 and skipped == 1
    assert row.ingest_offsets == [4, -1, 1] and row.ingest_topic == SOURCE
    again, skipped = fold_item_counters(row, [delta(4, "c"), delta(1, "d", partition=2)], dedupe_window=10)
    assert again is None and skipped == 2  # re-delivered: at the marks
    duplicate, skipped = fold_item_counters(row, [delta(5, "b")], dedupe_window=10)
    assert duplicate.interaction_count == 2 and duplicate.ingest_offsets[0] == 5 and skipped == 1  # marks move


def test_a_recreated_topic_resets_an_items_marks():
    row = ItemCounterRow(interaction_count=4, ingest_topic=SOURCE, ingest_offsets=[9, 9])
    folded, _ = fold_item_counters(row, [delta(0, "x", source="user-events@new")], dedupe_window=10)
    assert folded.ingest_topic == "user-events@new" and folded.ingest_offsets == [0]
    assert folded.interaction_count == 5


def test_item_attributes_apply_in_event_time_order_and_never_over_a_later_row():
    stored = {"genre": "drama", "year": 1990, "item_category": "old"}
    deltas = [delta(1, "b", seconds=300, attributes={"year": "2001"}, category="new"),
              delta(0, "a", seconds=200, attributes={"genre": "comedy", "year": "1999"})]
    row, latest_ms = fold_item_attributes(stored, 150, deltas)
    assert row == {"genre": "comedy", "year": "2001", "item_category": "new"} and latest_ms == 300_000
    assert fold_item_attributes(stored, 301, deltas) is None  # the row holds a later event's attributes
    assert stored["genre"] == "drama"  # the caller's row is not changed in place
