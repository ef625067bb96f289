import numpy as np
import pytest

from features.examples import CONTEXT, TEST, TRAIN, VALID, build_examples
from features.synthetic import SyntheticConfig, generate, relevant_positions

SMALL = SyntheticConfig(num_users=60, min_history=500, max_history=600, seed=7)


@pytest.fixture(scope="module")
def synthetic():
    frame, schema = generate(SMALL)
    return frame, build_examples(frame, schema)


def test_same_seed_same_data_other_seed_other_data(synthetic):
    frame, _ = synthetic
    again, _ = generate(SMALL)
    assert frame.equals(again)
    other, _ = generate(SyntheticConfig(num_users=60, min_history=500, max_history=600, seed=8))
    assert not frame.item_id.equals(other.item_id)


def test_schema_and_split_like_real_data(synthetic):
    frame, examples = synthetic
    assert {"user_id", "item_id", "timestamp", "label", "category", "split"} <= set(frame.columns)
    per_user = SMALL.targets_per_user
    assert (examples.split == TEST).sum() == (examples.split == VALID).sum() == 60 * SMALL.eval_targets
    assert (examples.split == TRAIN).sum() == 60 * (per_user - 2 * SMALL.eval_targets)
    assert (examples.split == CONTEXT).sum() == len(frame) - 60 * per_user
    lengths = frame[frame.split == "context"].groupby("user_id").size()
    assert lengths.between(SMALL.min_history, SMALL.max_history).all()


def test_planted_behaviours_are_far_back_and_drive_clicks(synthetic):
    _, examples = synthetic
    targets = np.flatnonzero(examples.split != CONTEXT)
    planted, labels = [], []
    for i in targets:
        relevant = relevant_positions(examples, i, 10_000)
        if len(relevant):
            # older than the recent window before the user's first target
            same_user = examples.user_id == examples.user_id[i]
            targets_before = np.count_nonzero(same_user & (examples.split != CONTEXT)
                                              & (examples.position < examples.position[i]))
            assert relevant.max() < examples.position[i] - targets_before - SMALL.recent_window
            assert SMALL.relevant_min <= len(relevant) <= SMALL.relevant_max
        planted.append(len(relevant) > 0)
        labels.append(examples.label[i])
    planted, labels = np.array(planted), np.array(labels)
    assert 0.35 < planted.mean() < 0.65
    assert labels[planted].mean() > 0.7 and labels[~planted].mean() < 0.3


def test_relevant_positions_follow_truncation(synthetic):
    _, examples = synthetic
    i = int(np.flatnonzero(examples.split == TEST)[0])
    full = relevant_positions(examples, i, 10_000)
    cut = 100
    recent = relevant_positions(examples, i, cut)
    dropped = examples.history_length[i] - cut
    assert recent.tolist() == [p - dropped for p in full if p >= dropped]
