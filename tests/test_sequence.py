import math

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.errors import ConfigError
from recsys.config import FeatureConfig, SequenceConfig, load_config
from recsys.data.batching import HISTORY_CATEGORIES, HISTORY_ITEMS, make_batch
from recsys.embeddings import UnifiedEmbedding
from recsys.sequence import SequenceEncoder, dare_reference, position_buckets, top_k_softmax

ITEM_PROBES, DIM = 2, 4
REPRESENTATION = [FeatureConfig("item_id", ITEM_PROBES), FeatureConfig("item_category", 1)]
REPR_DIM = (ITEM_PROBES + 1) * DIM
TARGETS = [(11, 1), (12, 2), (13, 1), (14, 3)]
HISTORIES = [  # (item, category), oldest first; one empty history (a new user)
    [(21, 1), (22, 2), (23, 1), (24, 3), (11, 1), (25, 2), (26, 1)],
    [],
    [(31, 1), (32, 1)],
    [(41, 3), (42, 3), (43, 2), (44, 1), (45, 3), (46, 3), (47, 3), (48, 2), (49, 1), (50, 3), (51, 3)],
]


def batch_kjt(targets=TARGETS, histories=HISTORIES) -> KeyedJaggedTensor:
    keys = ["item_id", "item_category", HISTORY_ITEMS, HISTORY_CATEGORIES]
    columns = [[[t[0]] for t in targets], [[t[1]] for t in targets],
               [[i for i, _ in h] for h in histories], [[c for _, c in h] for h in histories]]
    return KeyedJaggedTensor(keys=keys,
                             values=torch.tensor([v for col in columns for bag in col for v in bag]),
                             lengths=torch.tensor([len(bag) for col in columns for bag in col], dtype=torch.int32))


def dare_parts(top_k: int, mode: str = "dare"):
    torch.manual_seed(0)
    config = SequenceConfig(mode=mode, top_k=top_k, attention_dim=8, attention_rows=101, attention_probes=1,
                            position_buckets=4)
    encoder = SequenceEncoder(config, REPRESENTATION, DIM)
    unified = UnifiedEmbedding(REPRESENTATION, 97, DIM, extra_lookups=encoder.extra_lookups())
    return config, encoder, unified


def run_block(encoder, unified, sparse):
    search = encoder.search(sparse)
    embedded = unified(sparse, encoder.unified_ids(sparse, search))
    out = encoder(embedded[:, :unified.output_dim], embedded[:, unified.output_dim:], search)
    return out, search


@pytest.mark.parametrize("top_k", [1, 3, 64])
def test_dare_block_matches_the_plain_reference(top_k):
    config, encoder, unified = dare_parts(top_k)
    out, _ = run_block(encoder, unified, batch_kjt())
    want = dare_reference(encoder.space.ebc.embedding_bags["attention"].weight.detach(),
                          unified.ebc.embedding_bags["unified"].weight.detach(), config, REPRESENTATION,
                          TARGETS, HISTORIES)
    assert out.shape == (4, 3 * REPR_DIM)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert torch.all(out[1, REPR_DIM:] == 0)  # empty history: nothing pooled


def test_a_behaviour_reads_the_same_representation_rows_as_the_target():
    _, encoder, unified = dare_parts(top_k=64)
    # target 11 appears in the first history: its slot rows equal its target rows
    lookups = unified.lookup_kjt(batch_kjt(), encoder.unified_ids(batch_kjt(), encoder.search(batch_kjt())))
    target_rows = [lookups[f"item_id__p{p}"].values()[0] for p in range(ITEM_PROBES)]
    slot_rows = {int(lookups[f"{HISTORY_ITEMS}__p0__slot{j}"].values()[0]) for j in range(7)}
    assert int(target_rows[0]) in slot_rows


def test_gradients_stay_in_their_own_space():
    _, encoder, unified = dare_parts(top_k=3)
    attention, representation = encoder.space.ebc.embedding_bags["attention"].weight, \
        unified.ebc.embedding_bags["unified"].weight
    sparse = batch_kjt()

    search = encoder.search(sparse)  # the attention path: scores and their softmax
    (search.weights * torch.randn_like(search.weights)).sum().backward()
    assert attention.grad.abs().sum() > 0
    assert representation.grad is None

    attention.grad = None
    search = encoder.search(sparse)  # the representation path, at fixed attention weights
    search.weights = search.weights.detach()
    embedded = unified(sparse, encoder.unified_ids(sparse, search))
    encoder(embedded[:, :unified.output_dim], embedded[:, unified.output_dim:], search).sum().backward()
    assert representation.grad.abs().sum() > 0
    assert attention.grad is None


def test_coupled_baseline_trains_one_table_through_both_roles():
    _, encoder, unified = dare_parts(top_k=3, mode="coupled")
    out, _ = run_block(encoder, unified, batch_kjt())
    assert encoder.extra_lookups() == [] and out.shape == (4, 3 * encoder.space.dim)
    out.sum().backward()
    assert encoder.space.ebc.embedding_bags["coupled"].weight.grad.abs().sum() > 0
    assert unified.ebc.embedding_bags["unified"].weight.grad is None  # R(t) comes from the coupled table


def test_mean_pooling_baseline_is_the_mean_of_the_history_rows():
    _, encoder, unified = dare_parts(top_k=3, mode="mean")
    out, _ = run_block(encoder, unified, batch_kjt())
    weight = unified.ebc.embedding_bags["unified"].weight.detach()
    rows = unified.lookup_kjt(batch_kjt(), encoder.unified_ids(batch_kjt(), None))
    first = [weight[rows[f"{HISTORY_ITEMS}__p{p}"].values()[:7]].mean(0) for p in range(ITEM_PROBES)]
    first.append(weight[rows[f"{HISTORY_CATEGORIES}__p0"].values()[:7]].mean(0))
    torch.testing.assert_close(out[0, REPR_DIM:2 * REPR_DIM], torch.cat(first))


def test_top_k_at_least_l_is_full_softmax_attention():
    rng = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 0, 3, 9])
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    scores = torch.randn(int(lengths.sum()), generator=rng)
    values = torch.randn(int(lengths.sum()), 6, generator=rng)
    index, weights, valid = top_k_softmax(scores, offsets, k=9)
    for b in range(4):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        full = (torch.softmax(scores[lo:hi], 0).unsqueeze(1) * values[lo:hi]).sum(0) if hi > lo else torch.zeros(6)
        picked = values[(lo + index[b]).clamp(max=len(values) - 1)] * valid[b].unsqueeze(1)
        torch.testing.assert_close((weights[b].unsqueeze(1) * picked).sum(0), full)
    assert valid.sum(1).tolist() == [5, 0, 3, 9]
    assert not torch.isnan(weights).any()


def test_empty_histories_give_finite_gradients():
    _, encoder, unified = dare_parts(top_k=4)
    sparse = batch_kjt(TARGETS[:2], [[], []])  # a batch of new users only
    out, search = run_block(encoder, unified, sparse)
    out.sum().backward()
    assert search.weights.shape == (2, 0)
    assert torch.isfinite(unified.ebc.embedding_bags["unified"].weight.grad).all()


def test_position_buckets_count_later_behaviours_in_log2_steps():
    # a history of 6: later behaviours 5, 4, 3, 2, 1, 0 -> floor(log2(1 + later)), capped at 2
    assert position_buckets(torch.tensor([6, 0, 1]), 3).tolist() == [2, 2, 2, 1, 1, 0, 0]


def test_long_histories_are_truncated_to_the_most_recent_and_counted(ml100k_examples):
    ex = ml100k_examples
    longest = int(np.argmax(ex.history_length))
    batch = make_batch(ex, np.array([longest, 0]), ["item_id"], history_length=50)
    assert batch.truncated_histories == 1
    history = batch.sparse[HISTORY_ITEMS].to_dense()
    assert history[0].tolist() == ex.history(longest, 50).tolist() and len(history[1]) == 0
    categories = batch.sparse[HISTORY_CATEGORIES].to_dense()[0]
    start = ex.sequence_start[longest] + ex.history_length[longest] - 50
    assert categories.tolist() == ex.sequence_categories[start:start + 50].tolist()


@pytest.mark.parametrize("key,value,message", [
    ("sequence.top_k", 0, "sequence.top_k = 0: must be a whole number >= 1"),
    ("sequence.attention_dim", 0, "sequence.attention_dim = 0"),
    ("sequence.mode", "twin", "sequence.mode = 'twin': choose one of none, mean, coupled, dare"),
])
def test_bad_sequence_configs_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"sequence.mode": "dare", key: value})


def test_a_scale_check_on_a_long_history():
    """L = 10,000 behaviours: the search keeps exactly k and the block stays finite."""
    _, encoder, unified = dare_parts(top_k=16)
    history = [[(i, i % 7) for i in range(10_000)]]
    out, search = run_block(encoder, unified, batch_kjt(TARGETS[:1], history))
    assert search.valid.sum() == 16 and torch.isfinite(out).all()
    assert math.isclose(float(search.weights.detach().sum()), 1.0, rel_tol=1e-5)


def test_top_k_ties_keep_history_order_whatever_else_is_in_the_batch():
    """Colliding attention rows give equal scores; the kept behaviours must not depend on the
    batch's longest history (torch.topk's tie-breaking does)."""
    tied = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 3.0, 0.5])
    longer = torch.randn(300)
    alone = top_k_softmax(tied, torch.tensor([0, 7]), k=3)[0][0]
    together = top_k_softmax(torch.cat([longer, tied]), torch.tensor([0, 300, 307]), k=3)[0][1]
    assert alone.tolist() == together.tolist() == [1, 2, 4]


@pytest.mark.parametrize("mode,top_k", [("dare", 3), ("dare", 64), ("coupled", 3)])
def test_shared_histories_give_what_per_row_copies_give(mode, top_k):
    """Serving stores a user's history once for all their candidates; the block's output must
    equal that of every row carrying its own copy."""
    from recsys.sequence import SharedHistories

    _, encoder, unified = dare_parts(top_k, mode)
    groups = [HISTORIES[0], HISTORIES[3], HISTORIES[1]]  # three users, one of them new
    row_group = [0, 0, 1, 0, 1, 1, 2, 1]
    targets = [(11 + r, 1 + r % 3) for r in range(len(row_group))]
    per_row, _ = run_block(encoder, unified, batch_kjt(targets, [groups[g] for g in row_group]))

    shared = SharedHistories(items=torch.tensor([i for h in groups for i, _ in h]),
                             categories=torch.tensor([c for h in groups for _, c in h]),
                             lengths=torch.tensor([len(h) for h in groups]), row_group=torch.tensor(row_group))
    sparse = batch_kjt(targets, [[] for _ in row_group])  # the KJT's history keys are not read
    search = encoder.search(sparse, shared)
    embedded = unified(sparse, encoder.unified_ids(sparse, search, shared))
    together = encoder(embedded[:, :unified.output_dim], embedded[:, unified.output_dim:], search)
    torch.testing.assert_close(together, per_row, rtol=1e-6, atol=1e-6)


def test_position_buckets_match_the_log2_formula():
    lengths = torch.tensor([0, 1, 2, 3, 8, 9, 100, 1500])
    for num_buckets in (1, 2, 5, 12):
        want = [min(int(math.floor(math.log2(1 + length - 1 - i))), num_buckets - 1)
                for length in lengths.tolist() for i in range(length)]
        assert position_buckets(lengths, num_buckets).tolist() == want


def test_stable_top_k_is_a_stable_sort_cut_at_k():
    """Against a plain stable sort by score (earlier behaviour first on ties), on scores with many ties."""
    from recsys.sequence import padded_top_k

    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (16, 40), generator=generator).float()
    scores[3, 10:] = float("-inf")  # a short history
    for k in (1, 7, 40):
        top, index, valid = padded_top_k(scores, k)
        want = scores.sort(dim=1, descending=True, stable=True)
        assert torch.equal(index, want.indices[:, :k]) and torch.equal(top, want.values[:, :k])
        assert valid.tolist() == torch.isfinite(want.values[:, :k]).tolist()


def differentiable_dare(attention_weight, unified_weight, config, targets, histories):
    """``dare_reference`` with its scores kept as tensors, so autograd reaches the attention table
    through every behaviour's score (the top-k cut then passes gradient to the kept ones only)."""
    from recsys.hashing import hash_row_reference

    def attention(item, category, position=None):
        rows = [hash_row_reference(item, "attention:item_id", p, len(attention_weight))
                for p in range(config.attention_probes)]
        rows.append(hash_row_reference(category, "attention:category", 0, len(attention_weight)))
        if position is not None:
            rows.append(hash_row_reference(position, "attention:position", 0, len(attention_weight)))
        return sum(attention_weight[r] for r in rows)

    def represent(item, category):
        value = {"item_id": item, "item_category": category}
        return torch.cat([unified_weight[hash_row_reference(value[f.name], f.name, p, len(unified_weight))]
                          for f in REPRESENTATION for p in range(f.probes)])

    out = []
    for (item, category), history in zip(targets, histories):
        target = represent(item, category)
        pooled = torch.zeros_like(target)
        if history:
            a_target = attention(item, category)
            buckets = position_buckets(torch.tensor([len(history)]), config.position_buckets).tolist()
            scores = torch.stack([attention(i, c, bucket) @ a_target for (i, c), bucket in zip(history, buckets)])
            scores = scores / math.sqrt(attention_weight.shape[1])
            kept = sorted(range(len(history)), key=lambda i: -float(scores[i].detach()))[:config.top_k]
            weights = torch.softmax(scores[kept], dim=0)
            pooled = sum(w * represent(*history[i]) for w, i in zip(weights, kept))
        out.append(torch.cat([target, pooled, target * pooled]))
    return torch.stack(out)


@pytest.mark.parametrize("top_k", [3, 64])
def test_dare_gradients_match_the_plain_reference(top_k):
    """The search scores every behaviour without autograd and looks up the kept ones again with it;
    both tables must get the gradients of the plain example-by-example block."""
    config, encoder, unified = dare_parts(top_k)
    attention = encoder.space.ebc.embedding_bags["attention"].weight
    representation = unified.ebc.embedding_bags["unified"].weight
    projection = torch.randn(4, 3 * REPR_DIM, generator=torch.Generator().manual_seed(1))
    out, _ = run_block(encoder, unified, batch_kjt())
    (out * projection).sum().backward()
    got = attention.grad.clone(), representation.grad.clone()
    attention.grad, representation.grad = None, None
    want = differentiable_dare(attention, representation, config, TARGETS, HISTORIES)
    torch.testing.assert_close(want.detach(), dare_reference(attention.detach(), representation.detach(), config,
                                                             REPRESENTATION, TARGETS, HISTORIES))
    (want * projection).sum().backward()
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0
    torch.testing.assert_close(got[0], attention.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], representation.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["dare", "coupled"])
def test_the_search_gives_the_same_numbers_with_and_without_autograd(mode):
    """Training looks the kept behaviours up again; evaluation and serving reuse the first lookup."""
    _, encoder, unified = dare_parts(top_k=4, mode=mode)
    trained, _ = run_block(encoder, unified, batch_kjt())
    with torch.no_grad():
        evaluated, search = run_block(encoder, unified, batch_kjt())
    torch.testing.assert_close(trained.detach(), evaluated, rtol=0, atol=0)
    torch.testing.assert_close(search.picked, search.behaviours[search.flat_index] * search.valid.unsqueeze(-1))


def test_a_dare_training_step_updates_only_the_rows_of_targets_and_kept_behaviours(small_examples, tmp_path):
    """Under the Trainer (DMP, fused row-wise Adagrad): the attention table learns (through the softmax
    weights), and only the rows that the targets and the k kept behaviours read."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from recsys.train import Trainer
    from tests.conftest import small_config

    config = small_config()
    config.sequence.mode, config.sequence.top_k, config.data.max_history = "dare", 2, 30
    trainer = Trainer(config, examples=small_examples, out_dir=tmp_path)
    batch = make_batch(trainer.train_examples, np.arange(200, 208), trainer.batch_features, trainer.history_length)

    def attention_weight():
        value = trainer.model.state_dict()["sequence.space.ebc.embedding_bags.attention.weight"]
        return (value.local_shards()[0].tensor if isinstance(value, ShardedTensor) else value).detach().clone()

    space = trainer.model.module.sequence.space
    with torch.no_grad():
        search = trainer.model.module.sequence.search(batch.sparse)
    history = batch.sparse[HISTORY_ITEMS]
    buckets = position_buckets(history.lengths().long(), space.num_position_buckets)
    history_rows = space.rows(history.values(), batch.sparse[HISTORY_CATEGORIES].values(), buckets)
    kept_rows = history_rows[search.flat_index[search.valid]]
    target_rows = space.rows(batch.sparse["item_id"].values(), batch.sparse["item_category"].values(), None)
    read = set(torch.cat([kept_rows.flatten(), target_rows.flatten()]).tolist())
    assert len(set(history_rows.flatten().tolist()) - read) > 0  # behaviours not kept read other rows too

    before = attention_weight()
    trainer.train_step(batch)
    changed = set((attention_weight() != before).any(dim=1).nonzero().flatten().tolist())
    assert changed and changed <= read


@pytest.mark.parametrize("mode,table", [("dare", "attention"), ("coupled", "coupled")])
def test_attention_lr_sets_the_rate_of_the_attention_table_alone(small_examples, tmp_path, mode, table):
    """train.attention_lr reaches the fused kernel of the attention (or coupled) table and no other:
    row-wise Adagrad's first step is lr * g / sqrt(mean(g^2) + eps), so from the same weights and
    batch, 10x the rate moves that table's rows 10x as far, and the unified table's the same."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from recsys.train import Trainer
    from tests.conftest import small_config

    def first_step(attention_lr):
        config = small_config()
        config.sequence.mode, config.sequence.top_k, config.data.max_history = mode, 2, 30
        config.train.attention_lr = attention_lr
        trainer = Trainer(config.validate(), examples=small_examples, out_dir=tmp_path / str(attention_lr))
        batch = make_batch(trainer.train_examples, np.arange(200, 232), trainer.batch_features,
                           trainer.history_length)

        def weights():
            state = trainer.model.state_dict()
            return {key: (value.local_shards()[0].tensor if isinstance(value, ShardedTensor) else value).clone()
                    for key, value in state.items() if key.endswith(f"embedding_bags.{table}.weight")
                    or key.endswith("embedding_bags.unified.weight")}

        before = weights()
        trainer.train_step(batch)
        return {key.split(".")[-2]: value - before[key] for key, value in weights().items()}

    default, faster = first_step(None), first_step(10 * small_config().train.embedding_lr)
    assert default[table].abs().max() > 0
    torch.testing.assert_close(faster[table], 10 * default[table], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(faster["unified"], default["unified"], rtol=0, atol=0)


def test_attention_lr_is_refused_without_an_attention_table():
    with pytest.raises(ConfigError, match="train.attention_lr = 0.5: a rate > 0 for the attention table"):
        load_config(None, {"sequence.mode": "mean", "train.attention_lr": 0.5})
