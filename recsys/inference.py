"""The exported ranker as an inference program: Ranker.forward's scores in a few dozen tensor ops.

Serving scores one user against many candidates. ``Ranker.forward`` (training's
TorchRec path) hashes and looks up every (feature, probe) key on its own and gives
each of DARE's k picked behaviours a KJT key of its own: about 2,000 small ops for
100 candidates. This module computes the same numbers from the same weights
(``tests/test_inference.py`` holds them to 1e-5 on every shipped schema and
sequence mode):

    side(ids)   an entity's feature columns: every (value, salt) of its features hashed
                in one op, one ``embedding_bag`` per table (the unified table: one)
    items(ids)  per item, once per model version (the caller keeps the rows):
                its feature columns, A_item(x) = the sum of its attention rows but the
                position's, and R(x) = its representation columns
    logits      x = [features, dense, sequence] of each row from the user's part (once
                per call), the candidates' cached parts and the history block:
                A(h_i) = A_item(h_i) + P[bucket_i]; scores, stable top-k and softmax as
                recsys.sequence computes them; the picks' R(h) weighted and summed;
                then the ranker's cross layers, tower and head (the column order x is
                built in folded into their weights at load)

Both paths add the attention rows of a behaviour in the same order (item probes,
category, position), so equal behaviours score equally in both and the top-k
picks the same ones. No TorchRec, no KJT, no pandas here.
"""

from __future__ import annotations

import bisect
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from recsys import hashing
from recsys.embeddings import FullVocabEmbedding, HashedEmbedding, UnifiedEmbedding
from recsys.model import CrossNetV2, Ranker
from recsys.sequence import TARGET_ITEM

FEW_VALUES = 64  # up to this many (value, probe) pairs, a side is embedded with Python-int hashing

# Jagged raw ids of one feature for n entities: (values [m] int64, lengths [n] int64), as tensors or,
# for a side of a few values (one user's), as lists of Python ints (no tensor made only to be read back).
Jagged = tuple[torch.Tensor | list[int], torch.Tensor | list[int]]


def top_k_mixing(scores: torch.Tensor, k: int, logit_scale: float = 1.0) -> torch.Tensor:
    """[n, L]: each row's softmax over its k largest scores times ``logit_scale`` (tau; ties: the
    earlier behaviour first), 0 elsewhere. These are recsys.sequence.padded_top_k_softmax's weights put
    back at their behaviours' positions (a test holds the two equal): a weighted sum of the k picks is
    then one matmul, and the kept set needs no sort, only its threshold."""
    if scores.shape[1] > k:
        # the k-th largest score, counting equal scores apart, as topk(k).values.min() gives it: numpy's
        # introselect is 3-4x faster than torch.topk on [candidates, L] on CPU (bench/inference_engines.py)
        # The mask is made in numpy too: on these few-thousand-element arrays a numpy op costs a third
        # of a torch op's dispatch
        values = scores.numpy()
        length = values.shape[1]
        threshold = np.partition(values, length - k, axis=1)[:, length - k:length - k + 1]
        chosen = values >= threshold
        if not (chosen.sum(axis=1) == k).all():  # ties across the k-th place: the earlier ones make it
            above, tied = values > threshold, values == threshold
            room = k - above.sum(axis=1, keepdims=True)  # how many of the tied scores make the cut
            chosen = above | (tied & (tied.cumsum(axis=1) <= room))
        scores = scores.masked_fill(torch.from_numpy(~chosen), float("-inf"))
    return torch.softmax(scores * logit_scale, dim=1)  # the kept set is chosen on the unscaled scores


@dataclass
class FeatureTable:
    """How one feature reads its table: rows for all its probes from one hash (or a vocabulary)."""

    name: str
    table: int  # index into InferenceRanker.tables
    salts: torch.Tensor | None  # [probes] mixed salts (hashed kinds)
    num_rows: int
    vocabulary: torch.Tensor | None  # sorted known values (full-vocabulary kind): row = position + 1, else 0
    keys: int  # bags per entity in its table: probes for the unified table, 1 for a table of its own

    def __post_init__(self) -> None:
        self._salts = self.salts.tolist() if self.salts is not None else []
        self._vocabulary = self.vocabulary.tolist() if self.vocabulary is not None else []

    def python_row(self, value: int, key: int) -> int:
        """The row of one value for one key, with Python ints (the same row: tests/test_inference.py)."""
        if self.vocabulary is None:
            return hashing.hash_row(value, self._salts[key], self.num_rows)
        position = bisect.bisect_left(self._vocabulary, value)
        return position + 1 if position < len(self._vocabulary) and self._vocabulary[position] == value else 0

    def vocabulary_rows(self, values: torch.Tensor) -> torch.Tensor:
        """[m] rows of m raw ids in a full-vocabulary table (hashed features are hashed together, in
        InferenceRanker._embed_many)."""
        if len(self.vocabulary) == 0:
            return torch.zeros(len(values), dtype=torch.int64)
        position = torch.searchsorted(self.vocabulary, values).clamp(max=len(self.vocabulary) - 1)
        return torch.where(self.vocabulary[position] == values, position + 1, 0)


def _feature_tables(embedding: nn.Module) -> tuple[list[torch.Tensor], list[FeatureTable]]:
    bags = embedding.ebc.embedding_bags
    if isinstance(embedding, UnifiedEmbedding):
        weight = bags["unified"].weight.detach()
        return [weight], [
            FeatureTable(name, 0, torch.tensor([embedding._mixed_salts[(name, p)] for p in range(probes)]),
                         embedding.num_rows, None, probes)
            for name, probes in zip(embedding.features, embedding.feature_probes)]
    tables, lookups = [], []
    for index, name in enumerate(embedding.features):
        if isinstance(embedding, HashedEmbedding):
            tables.append(bags[f"hashed__{name}"].weight.detach())
            lookups.append(FeatureTable(name, index, torch.tensor([embedding._mixed_salts[index]]),
                                        embedding.rows_per_feature[index], None, 1))
        elif isinstance(embedding, FullVocabEmbedding):
            tables.append(bags[f"full__{name}"].weight.detach())
            lookups.append(FeatureTable(name, index, None, 0, getattr(embedding, f"vocabulary_{index}"), 1))
        else:
            raise TypeError(f"no inference path for embedding {type(embedding).__name__}")
    return tables, lookups


def _fold_input_order(ranker: Ranker, order: torch.Tensor) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Copies of the ranker's cross layers, tower and head that read x in the order this path builds it
    (x_model = x_built[:, order]) and give the same logits: the reorder costs a tenth of a forward
    as a gather (measured, bench/inference_engines.py), nothing folded into the weights.

    Cross layer x0 * (W x + b) + x is elementwise in its features: permuted rows and columns of W and
    entries of b compute the same values in built order. The first Linear after it takes permuted
    columns; every later layer is untouched."""
    cross, tower, head = (copy.deepcopy(m) for m in (ranker.cross, ranker.tower, ranker.head))
    with torch.no_grad():
        if isinstance(cross, CrossNetV2):
            for layer in cross.layers:
                weight = torch.empty_like(layer.weight)
                weight[order.unsqueeze(1), order.unsqueeze(0)] = layer.weight
                bias = torch.empty_like(layer.bias)
                bias[order] = layer.bias
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
        first = next((m for m in tower if isinstance(m, nn.Linear)), head)
        weight = torch.empty_like(first.weight)
        weight[:, order] = first.weight
        first.weight.copy_(weight)
    return cross, tower, head


@dataclass
class ItemVectors:
    """What the ranker reads of n items that does not depend on the user: computed once, kept."""

    columns: torch.Tensor  # [n, item feature columns] the item-side features' embeddings
    attention: torch.Tensor | None  # [n, d_a] A_item(x): attention rows of its id probes and category
    representation: torch.Tensor | None  # [n, d_r] R(x) (dare, mean); coupled represents by A


@dataclass
class History:
    """G histories (one per call), oldest first, as rows of the caller's item vectors."""

    attention: torch.Tensor | None  # [G, L, d_a] A_item of each behaviour (zeros past a history's end)
    representation: torch.Tensor | None  # [G, L, d_r]
    lengths: torch.Tensor  # [G] int64


class InferenceRanker(nn.Module):
    """A Ranker's inference, split into user side, item side and the per-row rest (see the module doc).

    ``user_features`` / ``item_features``: the ranker's features of each side (context features
    count as the user's: one value per call); ``user_dense`` / ``item_dense`` likewise for its
    dense inputs, by name, in any order.
    """

    def __init__(self, ranker: Ranker, user_features: list[str], item_features: list[str],
                 dense_names: list[str], user_dense: list[str]) -> None:
        super().__init__()
        embedding, sequence = ranker.embedding, ranker.sequence
        self.dim = embedding.dim
        self.tables, lookups = _feature_tables(embedding)
        by_name = {lookup.name: lookup for lookup in lookups}
        sides = set(user_features) | set(item_features)
        if sides != set(by_name) or set(user_features) & set(item_features):
            raise ValueError(f"user features {user_features} and item features {item_features} must split the "
                             f"ranker's {sorted(by_name)}")
        self.user_lookups = [by_name[n] for n in embedding.features if n in user_features]
        self.item_lookups = [by_name[n] for n in embedding.features if n in item_features]
        self.user_dense_names = [n for n in dense_names if n in user_dense]
        self.item_dense_names = [n for n in dense_names if n not in user_dense]

        # the ranker's input x = [features in config order, dense in manifest order, sequence]; this path
        # builds [user columns, user dense, item columns, item dense, sequence] and permutes once
        width = {name: probes * self.dim for name, probes in zip(embedding.features, embedding.feature_probes)}
        start = dict(zip(embedding.features, torch.tensor([0, *width.values()]).cumsum(0).tolist()))
        features_width = embedding.output_dim

        def columns(names: list[str]) -> list[int]:
            return [c for name in names for c in range(start[name], start[name] + width[name])]

        def dense_columns(names: list[str]) -> list[int]:
            return [features_width + dense_names.index(n) for n in names]

        user_columns = columns([lookup.name for lookup in self.user_lookups])
        item_columns = columns([lookup.name for lookup in self.item_lookups])
        built = (user_columns + dense_columns(self.user_dense_names) + item_columns
                 + dense_columns(self.item_dense_names))
        sequence_width = sequence.output_dim if sequence is not None else 0
        built += list(range(features_width + len(dense_names), features_width + len(dense_names) + sequence_width))
        self.register_buffer("input_order", torch.empty(len(built), dtype=torch.int64), persistent=False)
        self.input_order[torch.tensor(built)] = torch.arange(len(built))
        self.user_part_width = len(user_columns) + len(self.user_dense_names)

        self.mode = sequence.mode if sequence is not None else "none"
        if self.mode != "none":
            if TARGET_ITEM not in item_features:
                raise ValueError("a sequence model needs item_id among the item features")
            self.top_k = sequence.top_k
            # R(x): the target's representation columns, within the item columns
            item_position = {c: i for i, c in enumerate(item_columns)}
            self.representation_columns = torch.tensor([item_position[int(c)] for c in ranker.target_columns])
            self.representation_features = [name for name, _ in sequence.representation]
        self.space = sequence.space if sequence is not None else None
        tau = sequence.logit_scale() if self.space is not None else 1.0  # the softmax's, fixed or learned
        self.logit_scale = float(tau.detach()) if isinstance(tau, torch.Tensor) else float(tau)
        if self.space is not None:
            space = self.space
            self.attention_weight = next(iter(space.ebc.embedding_bags.values())).weight.detach()
            self.attention_salts = torch.tensor(space.item_salts)
            buckets = torch.arange(space.num_position_buckets)
            self.position_rows = self.attention_weight[
                hashing.hash_rows(buckets, space.position_salt, space.num_rows)]  # [buckets, d_a]
            self._position_rows_by_length: dict[int, torch.Tensor] = {}
        self.cross, self.tower, self.head = _fold_input_order(ranker, self.input_order)

    # --- the two sides ---

    def _embed(self, lookups: list[FeatureTable], ids: dict[str, Jagged], n: int) -> torch.Tensor:
        """[n, columns] of ``lookups``' features: every (value, probe) of the hashed features in one
        hash, one embedding_bag per table, bags mean-pooled (an empty bag: zeros) as the ranker's
        embedding collection pools them."""
        if not lookups:
            return torch.zeros(n, 0)
        if sum(len(ids[lookup.name][0]) * lookup.keys for lookup in lookups) <= FEW_VALUES:
            return self._embed_few(lookups, ids, n)
        return self._embed_many(lookups, ids, n)

    def _embed_many(self, lookups: list[FeatureTable], ids: dict[str, Jagged], n: int) -> torch.Tensor:
        # key-major, as the collection's KJT: feature f's bags of probe 0 for all n entities, then probe 1, ...
        ids = {name: tuple(torch.as_tensor(part, dtype=torch.int64) for part in jagged) for name, jagged in ids.items()}
        hashed = [lookup for lookup in lookups if lookup.vocabulary is None]
        rows_of: dict[str, torch.Tensor] = {}
        if hashed:
            # [keys, m] views of each feature's values and salts (expand copies nothing; cat copies once)
            sizes = [len(ids[lookup.name][0]) for lookup in hashed]
            values = torch.cat([ids[lookup.name][0].expand(lookup.keys, m).reshape(-1)
                                for lookup, m in zip(hashed, sizes)])
            salts = torch.cat([lookup.salts.unsqueeze(1).expand(lookup.keys, m).reshape(-1)
                               for lookup, m in zip(hashed, sizes)])
            moduli = {lookup.num_rows for lookup in hashed}
            modulus = moduli.pop() if len(moduli) == 1 else torch.cat(
                [torch.full((m * lookup.keys,), lookup.num_rows) for lookup, m in zip(hashed, sizes)])
            rows = hashing.hash_rows(values, salts, modulus)
            rows_of = dict(zip([lookup.name for lookup in hashed],
                               rows.split([m * lookup.keys for lookup, m in zip(hashed, sizes)])))
        by_table: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for lookup in lookups:
            rows = rows_of[lookup.name] if lookup.vocabulary is None else lookup.vocabulary_rows(ids[lookup.name][0])
            indices, bag_lengths = by_table.setdefault(lookup.table, ([], []))
            indices.append(rows)
            lengths = ids[lookup.name][1]
            bag_lengths.append(lengths if lookup.keys == 1 else lengths.expand(lookup.keys, n).reshape(-1))
        parts = []
        for table, (indices, bag_lengths) in by_table.items():
            lengths = torch.cat(bag_lengths)
            offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
            torch.cumsum(lengths, 0, out=offsets[1:])
            pooled = functional.embedding_bag(torch.cat(indices), self.tables[table], offsets,
                                              mode="mean", include_last_offset=True)
            parts.append(pooled.view(-1, n, pooled.shape[1]).transpose(0, 1).reshape(n, -1))
        return torch.cat(parts, dim=1)

    def _embed_few(self, lookups: list[FeatureTable], ids: dict[str, Jagged], n: int) -> torch.Tensor:
        """``_embed`` of a few values (one user's features): rows hashed with Python ints, then one
        embedding_bag per table. Each torch op costs microseconds whatever its size: the tensor hash's
        dozen ops took 10x longer than hashing a dozen values in Python (measured)."""
        by_table: dict[int, tuple[list[int], list[int]]] = {}
        for lookup in lookups:
            values, lengths = (part.tolist() if isinstance(part, torch.Tensor) else part for part in ids[lookup.name])
            indices, bag_lengths = by_table.setdefault(lookup.table, ([], []))
            for key in range(lookup.keys):
                indices.extend(lookup.python_row(v, key) for v in values)
                bag_lengths.extend(lengths)
        parts = []
        for table, (indices, bag_lengths) in by_table.items():
            offsets = [0]
            for length in bag_lengths:
                offsets.append(offsets[-1] + length)
            pooled = functional.embedding_bag(torch.tensor(indices, dtype=torch.int64), self.tables[table],
                                              torch.tensor(offsets), mode="mean", include_last_offset=True)
            parts.append(pooled.view(-1, n, pooled.shape[1]).transpose(0, 1).reshape(n, -1))
        return torch.cat(parts, dim=1)

    def user_part(self, ids: dict[str, Jagged], dense: torch.Tensor) -> torch.Tensor:
        """[G, user part] for G users: their (and their calls') feature columns, then ``dense``
        ([G, len(user_dense_names)], in that order)."""
        return torch.cat([self._embed(self.user_lookups, ids, len(dense)), dense], dim=1)

    def items(self, ids: dict[str, Jagged], category: torch.Tensor | None, n: int) -> ItemVectors:
        """The user-independent vectors of n items; ``category``: [n] their category ids (a
        sequence model over a schema with categories reads them)."""
        columns = self._embed(self.item_lookups, ids, n)
        attention = representation = None
        if self.mode != "none":
            representation = columns[:, self.representation_columns]
        if self.space is not None:
            space = self.space
            item_values = ids[TARGET_ITEM][0]
            rows = [hashing.hash_rows(item_values.unsqueeze(1), self.attention_salts.unsqueeze(0), space.num_rows)]
            if category is not None:
                rows.append(hashing.hash_rows(category, space.category_salt, space.num_rows).unsqueeze(1))
            rows = torch.cat(rows, dim=1)
            # added one row at a time, in bag order: the very sums fbgemm's SUM pooling makes
            attention = self.attention_weight[rows[:, 0]]
            for j in range(1, rows.shape[1]):
                attention = attention + self.attention_weight[rows[:, j]]
        return ItemVectors(columns, attention, representation)

    # --- per row ---

    def forward(self, user_part: torch.Tensor, item_columns: torch.Tensor, item_dense: torch.Tensor,
                row_group: torch.Tensor, history: History | None = None,
                item_attention: torch.Tensor | None = None,
                item_representation: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B] of B rows: row b is candidate b (its item columns, dense values, attention and
        representation vectors) of the call ``row_group[b]`` (whose user part and history it reads).
        A call's rows are consecutive, calls in order (as serving builds a batch)."""
        one_call = len(user_part) == 1  # the common batch: its row_group is all zeros
        parts = [user_part.expand(len(row_group), -1) if one_call else user_part[row_group], item_columns, item_dense]
        if self.mode != "none":
            calls = [len(row_group)] if one_call else torch.bincount(row_group, minlength=len(user_part)).tolist()
            parts.append(self._sequence(calls, history, item_attention, item_representation))
        x = torch.cat(parts, dim=1)  # in built order: the cross and first tower layers were permuted to read it
        return self.head(self.tower(self.cross(x))).squeeze(-1)

    def _positions(self, length: int) -> torch.Tensor:
        """[length, d_a] P[bucket] of a history of ``length``: bucket = min(floor(log2(1 + behaviours
        after it)), n - 1), as recsys.sequence.position_buckets computes it."""
        rows = self._position_rows_by_length.get(length)
        if rows is None:
            later = torch.arange(length - 1, -1, -1)
            buckets = torch.log2(later.double() + 1).floor().long().clamp(max=len(self.position_rows) - 1)
            rows = self._position_rows_by_length[length] = self.position_rows[buckets]
        return rows

    def _sequence(self, calls: list[int], history: History, target_attention: torch.Tensor | None,
                  target: torch.Tensor) -> torch.Tensor:
        """[R(t), p, R(t) * p] per row, as recsys.sequence.SequenceEncoder computes it; one call (one
        history) at a time, so scores are [candidates, L] matmuls, not a [B, L, d] gather."""
        if self.mode == "coupled":  # the searching vectors are also the representation
            target = target_attention
        pooled, end = [], 0
        for group, (rows, length) in enumerate(zip(calls, history.lengths.tolist())):
            begin, end = end, end + rows
            if rows == 0:
                continue
            if length == 0:  # no behaviours: p = 0
                pooled.append(target.new_zeros(rows, target.shape[1]))
            elif self.mode == "mean":
                pooled.append(history.representation[group, :length].mean(dim=0).expand(rows, -1))
            else:
                # A(h_i) = A_item(h_i) + P[bucket_i], added in the order the training path adds them
                behaviours = history.attention[group, :length] + self._positions(length)
                scores = target_attention[begin:end] @ behaviours.t() / math.sqrt(self.space.dim)
                mixing = top_k_mixing(scores, self.top_k, self.logit_scale)
                values = behaviours if self.mode == "coupled" else history.representation[group, :length]
                pooled.append(mixing @ values)
        pooled = torch.cat(pooled) if pooled else target.new_zeros(0, target.shape[1])
        return torch.cat([target, pooled, target * pooled], dim=1)
