import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import FeatureConfig
from recsys.data.batching import make_batch
from recsys.embeddings import (FullVocabEmbedding, HashedEmbedding, UnifiedEmbedding, build_embedding,
                               hashed_rows_for_budget, unified_lookup_reference)
from recsys.hashing import hash_row_reference

FEATURES = [FeatureConfig("user_id", 2), FeatureConfig("item_id", 3), FeatureConfig("genres", 1)]


def kjt(rows: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    keys = list(rows)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor([v for k in keys for bag in rows[k] for v in bag], dtype=torch.int64),
        lengths=torch.tensor([len(bag) for k in keys for bag in rows[k]], dtype=torch.int32))


RAW = {"user_id": [[7], [8], [7], [10**12]],
       "item_id": [[1], [2], [-3], [1]],
       "genres": [[4, 5], [], [5], [4, 5, 6, 7]]}  # multi-valued, with an empty bag


def test_unified_lookup_matches_the_plain_reference():
    torch.manual_seed(0)
    emb = UnifiedEmbedding(FEATURES, num_rows=97, dim=4)
    out = emb(kjt(RAW))
    weight = emb.ebc.embedding_bags["unified"].weight.detach()
    assert out.shape == (4, (2 + 3 + 1) * 4) == (4, emb.output_dim)
    torch.testing.assert_close(out, unified_lookup_reference(weight, FEATURES, RAW), rtol=1e-6, atol=1e-6)
    assert torch.all(out[1, -4:] == 0)  # the empty genre bag


def test_unified_lookup_on_real_movielens_batch(small_examples):
    names = ["user_id", "item_id", "gender", "occupation", "genres", "release_year"]
    features = [FeatureConfig(n, 2 if n.endswith("_id") else 1) for n in names]
    emb = UnifiedEmbedding(features, num_rows=1000, dim=8)
    batch = make_batch(small_examples, np.arange(64), names)
    raw = {n: [bag.tolist() for bag in batch.sparse[n].to_dense()] for n in names}
    weight = emb.ebc.embedding_bags["unified"].weight.detach()
    torch.testing.assert_close(emb(batch.sparse), unified_lookup_reference(weight, features, raw))


def test_one_table_one_key_per_probe():
    emb = UnifiedEmbedding(FEATURES, num_rows=97, dim=4)
    (config,) = emb.ebc.embedding_bag_configs()
    assert config.feature_names == ["user_id__p0", "user_id__p1", "item_id__p0", "item_id__p1", "item_id__p2",
                                    "genres__p0"]
    assert emb.num_parameters() == 97 * 4
    rows = emb.lookup_kjt(kjt(RAW))
    assert rows["item_id__p2"].values().tolist() == [hash_row_reference(v, "item_id", 2, 97) for v in (1, 2, -3, 1)]


def test_hashed_baseline_one_table_per_feature():
    emb = HashedEmbedding(FEATURES, {"user_id": 11, "item_id": 13, "genres": 5}, dim=4)
    assert emb.num_parameters() == 11 * 8 + 13 * 12 + 5 * 4
    out = emb(kjt(RAW))
    assert out.shape == (4, 24)
    weight = emb.ebc.embedding_bags["hashed__item_id"].weight.detach()
    want = torch.stack([weight[hash_row_reference(v[0], "item_id", 0, 13)] for v in RAW["item_id"]])
    torch.testing.assert_close(out[:, 8:20], want)


def test_full_vocabulary_baseline_has_no_collisions_and_an_unknown_row():
    vocab = {"user_id": torch.tensor([8, 7]), "item_id": torch.tensor([1, 2, -3]), "genres": torch.tensor([4, 5, 6])}
    emb = FullVocabEmbedding(FEATURES, vocab, dim=4)
    assert emb.num_parameters() == 3 * 8 + 4 * 12 + 4 * 4
    rows = emb.lookup_kjt(kjt(RAW))
    assert rows["user_id"].values().tolist() == [1, 2, 1, 0]  # sorted vocabulary, 10**12 unknown
    assert rows["item_id"].values().tolist() == [2, 3, 1, 2]
    assert rows["genres"].values().tolist() == [1, 2, 2, 1, 2, 3, 0]


def test_budget_split_for_hashing_trick():
    features = [FeatureConfig("user_id", 2), FeatureConfig("item_id", 2), FeatureConfig("gender", 1)]
    sizes = {"user_id": 943, "item_id": 1682, "gender": 2}
    rows = hashed_rows_for_budget(features, sizes, dim=8, budget_rows=1250)
    assert rows["gender"] == 3  # never more rows than values + 1
    assert rows["user_id"] == rows["item_id"]
    used = sum(rows[f.name] * f.probes * 8 for f in features)
    assert used <= 1250 * 8 and used + 2 * 2 * 8 > 1250 * 8  # one more row each would not fit


@pytest.mark.parametrize("kind", ["unified", "hashed", "full"])
def test_all_kinds_build_from_one_spec(kind):
    vocab = {"user_id": torch.arange(50), "item_id": torch.arange(80), "genres": torch.arange(19)}
    emb = build_embedding(kind, FEATURES, 4, 300, vocab)
    assert emb(kjt(RAW)).shape == (4, 24)
    if kind != "full":
        assert emb.num_parameters() <= 300 * 4
