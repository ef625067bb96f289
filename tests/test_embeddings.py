import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import FeatureConfig
from recsys.data.batching import make_batch
from recsys.embeddings import (FullVocabEmbedding, HashedEmbedding, UnifiedEmbedding, build_embedding,
                               hashed_budget_report, hashed_rows_for_budget,
                               unified_lookup_reference)
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


def hashed_rows_equal_reference(features, vocab_sizes, dim, budget_rows):
    """The former ``hashed_rows_for_budget``: one row count r for all, capped at vocabulary + 1."""
    budget = budget_rows * dim

    def cost(r):
        return sum(min(vocab_sizes[f.name] + 1, r) * f.probes * dim for f in features)

    lo, hi = 1, max(vocab_sizes[f.name] + 1 for f in features)
    if cost(lo) > budget:
        raise ValueError(f"a budget of {budget} parameters cannot give every feature one row")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
    return {f.name: min(vocab_sizes[f.name] + 1, lo) for f in features}


ML100K_SIZES = {"user_id": 943, "item_id": 1682, "age_bucket": 7, "gender": 2, "occupation": 21, "zip_prefix": 100,
                "genres": 19, "release_year": 70}
ML100K_FEATURES = [FeatureConfig(name, 2 if name.endswith("_id") else 1) for name in ML100K_SIZES]
ML100K_FULL = sum((ML100K_SIZES[f.name] + 1) * f.probes * 8 for f in ML100K_FEATURES)  # 43,832


def parameters(features, rows, dim):
    return sum(rows[f.name] * f.probes * dim for f in features)


def test_budget_split_for_hashing_trick():
    features = [FeatureConfig("user_id", 2), FeatureConfig("item_id", 2), FeatureConfig("gender", 1)]
    sizes = {"user_id": 943, "item_id": 1682, "gender": 2}
    rows = hashed_rows_for_budget(features, sizes, dim=8, budget_rows=1250)
    assert rows["gender"] == 3  # the small vocabulary gets its values + 1, not a share of the budget
    assert rows["item_id"] >= rows["user_id"] >= 1
    used = parameters(features, rows, 8)
    assert 1250 * 8 - 2 * 8 < used <= 1250 * 8


def test_hashed_budget_spent_on_movielens_sizes():
    rows = hashed_rows_for_budget(ML100K_FEATURES, ML100K_SIZES, dim=8, budget_rows=43_000 // 8)
    used = parameters(ML100K_FEATURES, rows, 8)
    assert 43_000 - len(ML100K_FEATURES) * 2 * 8 <= used <= 43_000
    report = hashed_budget_report(ML100K_FEATURES, rows, 8, budget_rows=43_000 // 8)
    assert report["total_parameters"] == used == sum(report["parameters"].values())
    assert report["parameters"]["user_id"] == rows["user_id"] * 16 and report["rows"] == rows
    assert report["budget_parameters"] - report["unspent_parameters"] == used


@pytest.mark.parametrize("budget", [ML100K_FULL, 50_000, 100_000, 250_008])
def test_a_budget_above_the_vocabularies_is_spent_in_proportion_to_them(budget):
    rows = hashed_rows_for_budget(ML100K_FEATURES, ML100K_SIZES, dim=8, budget_rows=budget // 8)
    used = parameters(ML100K_FEATURES, rows, 8)
    assert budget - 2 * 8 < used <= budget  # one row of the widest table at most is left
    scale = budget / ML100K_FULL  # >= 1: rows = scale * (vocab + 1), rounded
    for name, size in ML100K_SIZES.items():
        assert rows[name] >= size + 1
        assert abs(rows[name] - scale * (size + 1)) < 1
    if budget == ML100K_FULL:
        assert rows == {name: size + 1 for name, size in ML100K_SIZES.items()}
    old = hashed_rows_equal_reference(ML100K_FEATURES, ML100K_SIZES, 8, budget // 8)
    assert parameters(ML100K_FEATURES, old, 8) == ML100K_FULL  # the old split left the rest unspent


SWEEP_CASES = [
    (ML100K_FEATURES, ML100K_SIZES, 8, range(10, 15_000, 37)),
    ([FeatureConfig("a", 3), FeatureConfig("b", 1), FeatureConfig("c", 2), FeatureConfig("d", 1),
      FeatureConfig("e", 2)], {"a": 50, "b": 5000, "c": 0, "d": 311, "e": 311}, 4, range(9, 9000, 13)),
]


@pytest.mark.parametrize("features,sizes,dim,budgets", SWEEP_CASES)
def test_hashed_split_sweep_never_below_the_equal_split(features, sizes, dim, budgets):
    max_probes = max(f.probes for f in features)
    larger = [(a.name, b.name) for a in features for b in features if sizes[a.name] < sizes[b.name]]
    for budget_rows in budgets:
        rows = hashed_rows_for_budget(features, sizes, dim, budget_rows)
        old = hashed_rows_equal_reference(features, sizes, dim, budget_rows)
        assert all(rows[f.name] >= old[f.name] for f in features), budget_rows
        used = parameters(features, rows, dim)
        assert budget_rows * dim - max_probes * dim < used <= budget_rows * dim, budget_rows
        assert used >= parameters(features, old, dim)
        # rows grow with the vocabulary (two features of one vocabulary size may differ by the rounding row)
        assert all(rows[a] <= rows[b] for a, b in larger), (budget_rows, rows)


def test_hashed_split_too_small_a_budget_raises():
    smallest = sum(f.probes for f in ML100K_FEATURES)  # one row each: 10 rows of 8
    assert hashed_rows_for_budget(ML100K_FEATURES, ML100K_SIZES, 8, smallest) == {n: 1 for n in ML100K_SIZES}
    for budget_rows in (0, 1, smallest - 1):
        with pytest.raises(ValueError, match="cannot give every feature one row"):
            hashed_rows_for_budget(ML100K_FEATURES, ML100K_SIZES, 8, budget_rows)
        with pytest.raises(ValueError):
            hashed_rows_equal_reference(ML100K_FEATURES, ML100K_SIZES, 8, budget_rows)


def test_hashed_rows_grow_with_vocabulary_size():
    features = [FeatureConfig(f"f{i}", 1 + i % 2) for i in range(6)]
    sizes = {f"f{i}": size for i, size in enumerate([3, 40, 400, 900, 2000, 2001])}
    for budget_rows in (2_000, 6_000, 20_000):
        rows = hashed_rows_for_budget(features, sizes, 8, budget_rows)
        ordered = [rows[f"f{i}"] for i in range(6)]
        assert ordered == sorted(ordered)
    rows = hashed_rows_for_budget(ML100K_FEATURES, ML100K_SIZES, 8, 100_000 // 8)
    ordered = [rows[name] for name in sorted(ML100K_SIZES, key=ML100K_SIZES.get)]
    assert ordered == sorted(ordered) and len(set(ordered)) == len(ordered)  # strictly, above the vocabularies


def test_hashed_embedding_from_the_split_spends_the_budget():
    vocab = {"user_id": torch.arange(50), "item_id": torch.arange(80), "genres": torch.arange(19)}
    emb = build_embedding("hashed", FEATURES, 4, 2000, vocab)  # 8,000 parameters, > the vocabularies' 1,444
    assert 2000 * 4 - 3 * 4 < emb.num_parameters() <= 2000 * 4
    assert emb(kjt(RAW)).shape == (4, 24)


@pytest.mark.parametrize("kind", ["unified", "hashed", "full"])
def test_all_kinds_build_from_one_spec(kind):
    vocab = {"user_id": torch.arange(50), "item_id": torch.arange(80), "genres": torch.arange(19)}
    emb = build_embedding(kind, FEATURES, 4, 300, vocab)
    assert emb(kjt(RAW)).shape == (4, 24)
    if kind != "full":
        assert emb.num_parameters() <= 300 * 4


def test_unified_lookup_reads_features_in_any_key_order_beside_other_keys():
    """The batch's KJT may order its keys otherwise and carry keys the table does not read."""
    torch.manual_seed(0)
    emb = UnifiedEmbedding(FEATURES, num_rows=97, dim=4)
    shuffled = kjt({"genres": RAW["genres"], "history_item_id": [[1, 2], [], [3], [4, 5, 6]],
                    "item_id": RAW["item_id"], "user_id": RAW["user_id"]})
    weight = emb.ebc.embedding_bags["unified"].weight.detach()
    torch.testing.assert_close(emb(shuffled), unified_lookup_reference(weight, FEATURES, RAW), rtol=1e-6, atol=1e-6)
    rows = emb.lookup_kjt(shuffled)
    assert rows.keys() == emb.lookup_keys
    assert rows["user_id__p1"].values().tolist() == [hash_row_reference(v[0], "user_id", 1, 97)
                                                     for v in RAW["user_id"]]



def test_unified_rows_are_computed_on_the_ids_device():
    """key_rows made its per-value salts on the CPU, so training on CUDA failed at the first batch
    ("Expected all tensors to be on the same device", seen on an H200). The meta device stands in for
    CUDA here: the rows are computed where the ids are, and on the CPU they are unchanged."""
    embedding = UnifiedEmbedding([FeatureConfig("user_id", 2), FeatureConfig("item_id", 1)], 1000, 8, device="meta")
    keys, counts = [(0, 0), (0, 1), (1, 0)], [3, 3, 4]
    ids = torch.arange(10)
    rows = embedding.key_rows(keys, ids, counts)
    expected = torch.cat([embedding.rows(f, p, v) for (f, p), v in zip(keys, ids.split(counts))])
    assert torch.equal(rows, expected)
    on_meta = embedding.key_rows(keys, ids.to("meta"), counts)
    assert on_meta.device.type == "meta" and on_meta.shape == rows.shape
