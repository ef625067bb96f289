"""Long behaviour sequences: DARE and its baselines (mean pooling, coupled attention).

Feng et al., "Long-Sequence Recommendation Models Need Decoupled Embeddings",
ICLR 2025 (official code: thuml/DARE). For a target item t and the user's
behaviours h_1..h_L (oldest first):

    dare     s_i = <A(h_i), A(t)> / sqrt(d_a)       A: a small attention table
             K   = the top-k behaviours by s
             w   = softmax(tau * s_K)                 tau: the logit scale (see below)
             p   = sum_{i in K} w_i R(h_i)          R: the unified table's item rows,
                                                    looked up for the k picked behaviours only
             out = [R(t), p, R(t) * p]              target representation ("TR")
    coupled  the same with A = R = C: one table in both roles (TWIN / DIN style)
    mean     p = mean_i R(h_i),  out = [R(t), p, R(t) * p]

tau = exp(theta), theta one learned scalar per model (``sequence.logit_scale`` its initial
tau; ``sequence.learn_logit_scale``). The tables start at +-sqrt(1/rows) and the
row-wise Adagrad rate moves each entry by about the rate per step, so the raw scores stay
around 1e-4 at first and 0.1-0.6 after an epoch: a softmax over them is nearly uniform
(normalised entropy 0.98-0.9997, bench/dare_diagnostics.py) and the attention weights
nothing. tau > 0 leaves the top-k (and the search's cost) as it is; it only sets how
sharp the softmax over the kept ones is, the same for coupled and DARE.

R(x) is x's item id (and, when it is a feature, its category) in the unified
table: the same rows whether x is the target or a behaviour.
A(x) is the sum of the attention rows of x's item id (one row per probe), its
category and, for a behaviour, its position bucket floor(log2(1 + behaviours
after it)). The attention table is itself a unified table: each of those
features hashes into it with its own salts.

Why the shapes look as they do on CPU: sequence lookups with pooling NONE are
3.7-11x slower than pooled bags there (measured), so every item vector is a
SUM-pooled bag. The attention table is read with one key and stride B + N
(B targets, then the N behaviours of the batch), without autograd: only the k
kept behaviours reach the loss (the top-k cut passes no gradient to the others),
so they and the targets are read again, with autograd, as B + B x k bags, and the
backward touches B x k bags instead of B x L. DARE's k picks are read from the
unified table through k "slot" keys per (feature, probe) that use the feature's
salts, so a behaviour and a target item read the very same rows; all slot keys
are hashed in one op. (One weighted bag of the k picks per key, the softmax as
per-sample weights, is twice as fast on one process, but TorchRec's row-wise
input distribution passes no gradient to the weights: two ranks then train
another model, found by tests/test_distributed.py.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys import hashing
from recsys.config import FeatureConfig, SequenceConfig
from recsys.data.batching import HISTORY_CATEGORIES, HISTORY_ITEMS

TARGET_ITEM = "item_id"
TARGET_CATEGORY = "item_category"
# R(x), the representation of an item: its rows of these features in the unified table.
# A behaviour reads them through its history key, with the feature's salts.
REPRESENTATION_FEATURES = {TARGET_ITEM: HISTORY_ITEMS, TARGET_CATEGORY: HISTORY_CATEGORIES}
# theta = log(tau) is stored divided by this: it learns this many times the dense (Adam) rate
LOG_SCALE_RATE = 10.0


def position_buckets(lengths: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """For each behaviour of a jagged batch (oldest first): min(floor(log2(1 + later behaviours)), n - 1)."""
    ends = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)[1:]
    total = int(ends[-1]) if len(ends) else 0
    later = ends.repeat_interleave(lengths, output_size=total) - 1 - torch.arange(total, device=lengths.device)
    # in integers: the bucket is how many of 2^j - 1 (j = 1 .. n - 1) are <= later
    bounds = (1 << torch.arange(1, num_buckets, device=lengths.device)) - 1
    return torch.bucketize(later, bounds, right=True)


def jagged_dot(behaviours: torch.Tensor, offsets: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """<behaviour_i, target of its row> for a jagged [N, d] batch: fbgemm's jagged x dense bmm,
    1.5x faster forward + backward on CPU than gathering the targets to [N, d] (measured)."""
    if len(behaviours) == 0:
        return behaviours.new_zeros(0)
    max_length = int((offsets[1:] - offsets[:-1]).max())
    return torch.ops.fbgemm.jagged_dense_bmm(behaviours, offsets, target.unsqueeze(2), max_length)[0].squeeze(1)


@dataclass
class Search:
    """The k behaviours kept per example: positions in its history, softmax weights, and masks."""

    index: torch.Tensor  # [B, k'] position in the example's history (k' = min(k, longest history))
    flat_index: torch.Tensor  # [B, k'] position in the batch's flat history values (0 where invalid)
    weights: torch.Tensor  # [B, k'] softmax over the kept scores; 0 where invalid
    valid: torch.Tensor  # [B, k'] False past the end of a short (or empty) history
    target: torch.Tensor  # [B, d] the target's vector in the searching space
    behaviours: torch.Tensor  # [N, d] every behaviour's vector in the searching space, without autograd
    picked: torch.Tensor  # [B, k', d] the kept behaviours' vectors (zeros where invalid), with autograd


def _stable_top_k(padded: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk per row where equal values keep position order (earlier first).

    Equal scores are common (behaviours whose attention rows collide), and torch.topk breaks
    ties differently as the padded width changes, so a call's scores would depend on what else
    shares its batch (found by serving's batched-vs-alone test). A full stable sort is 5-13x
    slower than topk at L = 1,000-5,000 on CPU; this costs one topk plus a few passes.
    """
    threshold = padded.topk(k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    above = padded > threshold
    tied = padded == threshold
    room = k - above.sum(dim=1, keepdim=True)  # how many of the tied values make the cut
    # (an int64 cumsum of bools is 10x slower on CPU than an int32 one, measured)
    chosen = above | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= room))
    position = chosen.nonzero()[:, 1].view(len(padded), k)  # exactly k per row, in history order
    values = padded.gather(1, position)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), position.gather(1, order)


def pad_scores(scores: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Jagged scores [N] -> [B, longest history], padded with -inf."""
    batch_size = len(offsets) - 1
    max_length = int((offsets[1:] - offsets[:-1]).max()) if batch_size else 0
    if max_length == 0:
        return scores.new_zeros(batch_size, 0)
    return torch.ops.fbgemm.jagged_to_padded_dense(scores.unsqueeze(1), [offsets], [max_length],
                                                   float("-inf")).squeeze(-1)


def top_k_softmax(scores: torch.Tensor, offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Top-k of jagged scores per row (ties: the earlier behaviour first), and a softmax over the kept ones.

    Returns (index [B, k'], weights [B, k'], valid [B, k']); a row shorter than k
    (or empty) has invalid slots with weight 0, never NaN.
    """
    return padded_top_k_softmax(pad_scores(scores, offsets), k)


def padded_top_k(padded: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """(top scores, index, valid), each [B, k'], of scores padded to [B, L] with -inf."""
    if padded.shape[1] == 0:
        empty = padded.new_zeros(len(padded), 0)
        return empty, empty.long(), empty.bool()
    top, index = _stable_top_k(padded, min(k, padded.shape[1]))
    return top, index, torch.isfinite(top)


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax per row over the ``valid`` scores; exactly 0 elsewhere, and never NaN for a row with none."""
    if scores.shape[1] == 0:  # max over an empty dimension fails
        return scores.new_zeros(scores.shape)
    masked = scores.masked_fill(~valid, float("-inf"))
    shift = masked.max(dim=1, keepdim=True).values.clamp_min(-1e30).detach()
    unnormalised = torch.exp(masked - shift)  # exactly 0 where invalid
    return unnormalised / unnormalised.sum(dim=1, keepdim=True).clamp_min(1e-30)


def padded_top_k_softmax(padded: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """``top_k_softmax`` of scores already padded to [B, L] with -inf."""
    top, index, valid = padded_top_k(padded, k)
    return index, masked_softmax(top, valid), valid


class ItemSpace(nn.Module):
    """A small unified table of item vectors: A(x) = sum of x's (id probes, category, position) rows."""

    def __init__(self, name: str, num_rows: int, dim: int, item_probes: int, num_position_buckets: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.key = f"{name}_bag"
        self.num_rows, self.dim, self.num_position_buckets = num_rows, dim, num_position_buckets
        self.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name=name, num_embeddings=num_rows, embedding_dim=dim, feature_names=[self.key],
            pooling=PoolingType.SUM)], device=torch.device(device or "cpu"))
        self.item_salts = [hashing.mixed_salt(f"{name}:item_id", p) for p in range(item_probes)]
        self.category_salt = hashing.mixed_salt(f"{name}:category", 0)
        self.position_salt = hashing.mixed_salt(f"{name}:position", 0)

    def rows(self, items: torch.Tensor, categories: torch.Tensor | None,
             positions: torch.Tensor | None) -> torch.Tensor:
        """[n, bag size] table rows of n items: item probes, category, position (one hash for all)."""
        columns, salts = [items] * len(self.item_salts), list(self.item_salts)
        if categories is not None:
            columns.append(categories)
            salts.append(self.category_salt)
        if positions is not None:
            columns.append(positions)
            salts.append(self.position_salt)
        ids = torch.stack([column.to(torch.int64) for column in columns], dim=1)
        return hashing.hash_rows(ids, torch.tensor(salts, device=ids.device), self.num_rows)

    def lookup(self, blocks: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
        """[n, d] vectors of each block of n bags, all in one pooled lookup. A block is (rows
        [n, bag size], keep [n] bool or None); a bag not kept is empty (a zero vector)."""
        values, lengths = [], []
        for rows, keep in blocks:
            bag_lengths = torch.full((len(rows),), rows.shape[1], dtype=torch.int32, device=rows.device)
            if keep is None:
                values.append(rows.flatten())
            else:
                values.append(rows[keep].flatten())
                bag_lengths = bag_lengths * keep
            lengths.append(bag_lengths)
        bags = KeyedJaggedTensor(keys=[self.key], values=torch.cat(values), lengths=torch.cat(lengths))
        return list(self.ebc(bags).values().split([len(rows) for rows, _ in blocks]))

    def item_vectors(self, items: torch.Tensor, categories: torch.Tensor | None) -> torch.Tensor:
        """[n, d]: A(item) of n items read straight from the table (for publishing)."""
        weight = next(iter(self.ebc.embedding_bags.values())).weight
        return weight[self.rows(items, categories, None)].sum(dim=1)

    def forward(self, target_items: torch.Tensor, target_categories: torch.Tensor | None,
                history_items: torch.Tensor, history_categories: torch.Tensor | None,
                history_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, d] target vectors, [N, d] behaviour vectors) from one pooled lookup of B + N bags."""
        buckets = position_buckets(history_lengths, self.num_position_buckets)
        target, behaviours = self.lookup([(self.rows(target_items, target_categories, None), None),
                                          (self.rows(history_items, history_categories, buckets), None)])
        return target, behaviours


@dataclass
class SharedHistories:
    """Histories that several rows share (serving: one user, many candidates), each stored once.

    Group g's behaviours are ``items[o_g : o_g + lengths[g]]`` (oldest first, o = offsets of
    ``lengths``); row b reads group ``row_group[b]``. Without it every row carries its own copy
    in the batch's history keys: the search then looks up B x L behaviour vectors in the
    attention table instead of G x L (the B x L dot products remain).
    """

    items: torch.Tensor  # [sum of lengths] int64 raw item ids
    categories: torch.Tensor | None  # the same shape, raw category ids (when the model reads them)
    lengths: torch.Tensor  # [G] int64
    row_group: torch.Tensor  # [B] int64


def search_space(space: ItemSpace, top_k: int, target_items: torch.Tensor, target_categories: torch.Tensor | None,
                 history_items: torch.Tensor, history_categories: torch.Tensor | None,
                 lengths: torch.Tensor, row_group: torch.Tensor | None = None,
                 logit_scale: torch.Tensor | float = 1.0) -> Search:
    """The search stage: item vectors, scaled dot products with the target, top-k + softmax.

    The top-k ranks the scaled dot products; the softmax reads them times ``logit_scale`` (> 0: the
    same kept set).

    ``lengths`` are per row, or per group of rows sharing a history (``row_group``: each row's group).
    Every behaviour is scored without autograd; under autograd the targets and the kept behaviours
    are looked up again, so gradients (the same: the others' are zero) reach B x k bags, not B x L.
    """
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    target_rows = space.rows(target_items, target_categories, None)
    history_rows = space.rows(history_items, history_categories,
                              position_buckets(lengths, space.num_position_buckets))
    scale = math.sqrt(space.dim)
    with torch.no_grad():
        target, behaviours = space.lookup([(target_rows, None), (history_rows, None)])
        if row_group is None:
            padded = pad_scores(jagged_dot(behaviours, offsets, target) / scale, offsets)
            starts = offsets[:-1]
        else:
            max_length = int(lengths.max()) if len(lengths) else 0
            groups = torch.ops.fbgemm.jagged_to_padded_dense(behaviours, [offsets], [max_length], 0.0)  # [G, L, d]
            scores = torch.einsum("bld,bd->bl", groups[row_group], target) / scale
            past_end = torch.arange(max_length, device=scores.device) >= lengths[row_group].unsqueeze(1)
            padded = scores.masked_fill(past_end, float("-inf"))
            starts = offsets[:-1][row_group]
        _, index, valid = padded_top_k(padded, top_k)
    flat_index = torch.where(valid, starts.unsqueeze(1) + index, torch.zeros_like(index))
    if torch.is_grad_enabled():
        target, picked = space.lookup([(target_rows, None), (history_rows[flat_index.flatten()], valid.flatten())])
        picked = picked.view(*valid.shape, space.dim)
    else:
        picked = behaviours[flat_index] * valid.unsqueeze(-1)
    weights = masked_softmax(torch.einsum("bkd,bd->bk", picked, target) * (logit_scale / scale), valid)
    return Search(index, flat_index, weights, valid, target, behaviours, picked)


class SequenceEncoder(nn.Module):
    """The history part of the ranker; see the module docstring for the four modes."""

    def __init__(self, config: SequenceConfig, representation: list[FeatureConfig], dim: int,
                 device: torch.device | str | None = None) -> None:
        """``representation``: the item features (of REPRESENTATION_FEATURES) that make R(x)."""
        super().__init__()
        self.mode, self.top_k = config.mode, config.top_k
        self.representation = [(f.name, f.probes) for f in representation]
        self.representation_dim = sum(probes for _, probes in self.representation) * dim
        self.space: ItemSpace | None = None
        if config.mode == "dare":
            self.space = ItemSpace("attention", config.attention_rows, config.attention_dim,
                                   config.attention_probes, config.position_buckets, device)
        elif config.mode == "coupled":
            self.space = ItemSpace("coupled", config.attention_rows, config.coupled_dim or self.representation_dim,
                                   config.attention_probes, config.position_buckets, device)
        width = self.space.dim if config.mode == "coupled" else self.representation_dim
        self.output_dim = 3 * width
        # tau = exp(theta), the softmax's logit scale. Learned: theta / LOG_SCALE_RATE is a dense
        # parameter (the tower's Adam, which moves a parameter by about its rate per step whatever
        # the gradient's size: theta moves LOG_SCALE_RATE x the dense rate). Fixed: a constant and
        # no parameter, so a model without it loads and serves as before.
        self.fixed_logit_scale, self.log_logit_scale = config.logit_scale, None
        if self.space is not None and config.learn_logit_scale:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale) / LOG_SCALE_RATE))

    def logit_scale(self) -> torch.Tensor | float:
        """tau, the factor of the scores in the softmax over the kept behaviours."""
        if self.log_logit_scale is None:
            return self.fixed_logit_scale
        return (self.log_logit_scale * LOG_SCALE_RATE).exp()

    def extra_lookups(self) -> list[tuple[str, str, int]]:
        """(key, feature, probe) lookups this mode adds to the unified table."""
        keys = [(REPRESENTATION_FEATURES[f], f, p) for f, probes in self.representation for p in range(probes)]
        if self.mode == "mean":  # one bag per example: the whole history, mean-pooled
            return [(f"{key}__p{p}", f, p) for key, f, p in keys]
        if self.mode == "dare":  # one bag of one item per kept behaviour
            return [(f"{key}__p{p}__slot{j}", f, p) for j in range(self.top_k) for key, f, p in keys]
        return []

    def search(self, sparse: KeyedJaggedTensor, shared: SharedHistories | None = None) -> Search | None:
        """Score every behaviour against the target in the searching space and keep the top k."""
        if self.space is None:
            return None
        by_key = sparse.to_dict()
        target_category = by_key[TARGET_CATEGORY].values() if TARGET_CATEGORY in by_key else None
        if shared is not None:
            return search_space(self.space, self.top_k, by_key[TARGET_ITEM].values(), target_category,
                                shared.items, shared.categories if target_category is not None else None,
                                shared.lengths, shared.row_group, self.logit_scale())
        history = by_key[HISTORY_ITEMS]
        history_category = by_key[HISTORY_CATEGORIES].values() if HISTORY_CATEGORIES in by_key else None
        return search_space(self.space, self.top_k, by_key[TARGET_ITEM].values(), target_category,
                            history.values(), history_category, history.lengths().long(),
                            row_group=None, logit_scale=self.logit_scale())

    def unified_ids(self, sparse: KeyedJaggedTensor, search: Search | None,
                    shared: SharedHistories | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Raw ids (values, lengths) of all ``extra_lookups``, key-major; None when there are none."""
        if shared is not None:
            if self.mode == "mean":
                raise ValueError("sequence mode 'mean' reads each row's whole history: pass per-row histories")
            shared_values = {HISTORY_ITEMS: shared.items, HISTORY_CATEGORIES: shared.categories}
            histories = [shared_values[REPRESENTATION_FEATURES[f]] for f, _ in self.representation]
        else:
            by_key = sparse.to_dict()
            if self.mode == "mean":
                jagged = [(by_key[REPRESENTATION_FEATURES[f]], probes) for f, probes in self.representation]
                return (torch.cat([h.values() for h, probes in jagged for _ in range(probes)]),
                        torch.cat([h.lengths() for h, probes in jagged for _ in range(probes)]))
            histories = [by_key[REPRESENTATION_FEATURES[f]].values() for f, _ in self.representation]
        if self.mode != "dare":
            return None
        # slot key (j, feature, probe) holds row b's j-th kept behaviour, or an empty bag
        probes = torch.tensor([probes for _, probes in self.representation], device=search.valid.device)
        picked = torch.stack([values[search.flat_index] for values in histories]).repeat_interleave(probes, dim=0)
        valid = search.valid.T.unsqueeze(1).expand(-1, len(picked), -1)  # [k', keys per slot, B]
        lengths = valid.to(torch.int32).flatten()
        missing_slots = (self.top_k - search.valid.shape[1]) * len(picked) * len(search.valid)
        return (picked.permute(2, 0, 1)[valid],
                torch.cat([lengths, lengths.new_zeros(missing_slots)]))

    def forward(self, target_representation: torch.Tensor, extra_embeddings: torch.Tensor,
                search: Search | None) -> torch.Tensor:
        """[R(t), p, R(t) * p] from the unified lookups and the search."""
        if self.mode == "mean":
            pooled = extra_embeddings
        elif self.mode == "dare":
            slots = extra_embeddings.view(len(extra_embeddings), self.top_k, self.representation_dim)
            kept = search.weights.shape[1]
            pooled = (search.weights.unsqueeze(-1) * slots[:, :kept]).sum(dim=1)
        else:  # coupled: the searching vectors are also the representation
            target_representation = search.target
            pooled = (search.weights.unsqueeze(-1) * search.picked).sum(dim=1)
        return torch.cat([target_representation, pooled, target_representation * pooled], dim=1)


# --- plain-PyTorch reference of the DARE block, for the agreement test ---


def dare_reference(attention_weight: torch.Tensor, unified_weight: torch.Tensor, config: SequenceConfig,
                   representation: list[FeatureConfig], targets: list[tuple[int, int]],
                   histories: list[list[tuple[int, int]]], logit_scale: float | None = None) -> torch.Tensor:
    """DARE example by example with the pure-Python hash: ``targets[b]`` = (item, category),
    ``histories[b]`` = [(item, category), ...] oldest first; ``logit_scale``: tau (None: the
    config's initial one). Returns [B, 3 * d_r]."""
    tau = config.logit_scale if logit_scale is None else logit_scale
    attention_rows, d_a = attention_weight.shape
    unified_rows = unified_weight.shape[0]

    def attention(item: int, category: int, position: int | None) -> torch.Tensor:
        rows = [hashing.hash_row_reference(item, "attention:item_id", p, attention_rows)
                for p in range(config.attention_probes)]
        rows.append(hashing.hash_row_reference(category, "attention:category", 0, attention_rows))
        if position is not None:
            rows.append(hashing.hash_row_reference(position, "attention:position", 0, attention_rows))
        return sum(attention_weight[r] for r in rows)

    def represent(item: int, category: int) -> torch.Tensor:
        value = {TARGET_ITEM: item, TARGET_CATEGORY: category}
        return torch.cat([unified_weight[hashing.hash_row_reference(value[f.name], f.name, p, unified_rows)]
                          for f in representation for p in range(f.probes)])

    out = []
    for (target_item, target_category), history in zip(targets, histories):
        target_repr = represent(target_item, target_category)
        pooled = torch.zeros_like(target_repr)
        if history:
            a_target = attention(target_item, target_category, None)
            scores = []
            for i, (item, category) in enumerate(history):
                later = len(history) - 1 - i
                bucket = min(int(math.floor(math.log2(later + 1))), config.position_buckets - 1)
                scores.append(float(attention(item, category, bucket) @ a_target) / math.sqrt(d_a))
            kept = sorted(range(len(history)), key=lambda i: -scores[i])[:config.top_k]
            weights = torch.softmax(tau * torch.tensor([scores[i] for i in kept]), dim=0)
            pooled = sum(w * represent(*history[i]) for w, i in zip(weights, kept))
        out.append(torch.cat([target_repr, pooled, target_repr * pooled]))
    return torch.stack(out)
