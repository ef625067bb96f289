"""Categorical embeddings on TorchRec: the unified table and its two baselines.

All three take a KeyedJaggedTensor of *raw* ids (one key per feature) and
return one row per example: the features' embeddings concatenated in config
order, feature ``f`` taking ``probes_f * dim`` columns. Multi-valued features
(a movie's genres) are mean-pooled; a missing value (empty bag) gives zeros.

- ``UnifiedEmbedding``: one table of ``num_rows x dim`` shared by every feature
  (Coleman et al., 2023). Probe p of feature f reads row hash(v, salt(f, p)) mod N.
  In TorchRec terms: one ``EmbeddingBagConfig`` whose ``feature_names`` are the
  (feature, probe) keys ``f__p<p>``; to the sharding planner it is one table.
- ``HashedEmbedding``: the hashing trick, one hashed table per feature.
- ``FullVocabEmbedding``: one table per feature with a row for every value seen in
  training ("no collisions"), row 0 for values never seen.

Hashing happens inside ``forward`` so an exported model takes raw ids.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys import hashing
from recsys.config import FeatureConfig

UNIFIED_TABLE = "unified"


def probe_key(feature: str, probe: int) -> str:
    # not "@": TorchRec uses "feature@table" internally for mean pooling
    return f"{feature}__p{probe}"


class _LookupEmbedding(nn.Module):
    """Raw-id KJT -> rows per lookup key -> one EmbeddingBagCollection -> concatenated embeddings.

    A subclass lists its lookups as (feature, probe, key) in output order, one
    key per EBC feature name, and says how a feature's raw ids become rows for
    one probe.
    """

    def __init__(self, features: list[FeatureConfig], dim: int, tables: list[EmbeddingBagConfig],
                 lookups: list[tuple[str, int, str]], device: torch.device | str | None = None) -> None:
        super().__init__()
        self.features = [f.name for f in features]
        self.feature_probes = [f.probes for f in features]
        self.dim = dim
        self.output_dim = sum(f.probes for f in features) * dim
        self.lookups = [(self.features.index(name), name, probe) for name, probe, _ in lookups]
        self.lookup_keys = [key for _, _, key in lookups]
        # extra lookups (history items of sequence models) read a feature's rows under other keys;
        # only the unified table has them
        self.extra_lookups: list[tuple[int, str, int]] = []
        self.extra_keys: list[str] = []
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device(device or "cpu"))

    def rows(self, feature_index: int, probe: int, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def key_rows(self, keys: list[tuple[int, int]], values: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The rows of ``values``, whose first ``counts[0]`` are read under key 0 = (feature index,
        probe), the next ``counts[1]`` under key 1, and so on."""
        return torch.cat([self.rows(feature, probe, v)
                          for (feature, probe), v in zip(keys, values.split(counts))])

    def lookup_kjt(self, features: KeyedJaggedTensor,
                   extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> KeyedJaggedTensor:
        """The KJT of table rows that the embedding collection reads.

        ``extra`` gives (raw ids, lengths) of all ``extra_keys``, key-major like a KJT: lengths
        holds batch-size bags per extra key.
        """
        keys = features.keys()
        missing = [f for f in self.features if f not in keys]
        if missing:
            raise KeyError(f"batch lacks feature(s) {missing}; it has {keys}")
        if (extra is None) != (not self.extra_keys):
            raise ValueError(f"expected raw ids for the {len(self.extra_keys)} extra keys"
                             if self.extra_keys else "this embedding has no extra keys")
        # the batch's values sliced per key, then every lookup key's values gathered in one cat
        position = [keys.index(name) for _, name, _ in self.lookups]
        per_key_values = features.values().split(features.length_per_key())
        length_per_key = features.length_per_key()
        values = [per_key_values[i] for i in position]
        counts = [length_per_key[i] for i in position]
        lengths = [features.lengths().view(len(keys), -1)[position].flatten().to(torch.int32)]
        if extra is not None:
            extra_values, extra_lengths = extra
            values.append(extra_values)
            counts += extra_lengths.view(len(self.extra_keys), -1).sum(dim=1).tolist()
            lengths.append(extra_lengths.to(torch.int32))
        rows = self.key_rows([(f, p) for f, _, p in self.lookups + self.extra_lookups], torch.cat(values), counts)
        return KeyedJaggedTensor(keys=self.lookup_keys + self.extra_keys, values=rows, lengths=torch.cat(lengths))

    def forward(self, features: KeyedJaggedTensor,
                extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """[B, output_dim] embeddings, then ``dim`` columns per extra key if ``extra`` is given."""
        return self.ebc(self.lookup_kjt(features, extra)).values()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.ebc.parameters())

    def embed_values(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """[n, probes * dim]: the embedding of n single values of feature ``name``, as a bag
        of one id would give it (e.g. every item's id embedding, for publishing)."""
        table_of = {key: config.name for config in self.ebc.embedding_bag_configs() for key in config.feature_names}
        parts = [self.ebc.embedding_bags[table_of[key]].weight[self.rows(index, probe, values)]
                 for (index, feature, probe), key in zip(self.lookups, self.lookup_keys) if feature == name]
        return torch.cat(parts, dim=1)


class UnifiedEmbedding(_LookupEmbedding):
    """``extra_lookups``: (key, feature, probe) triples for more lookups into the same rows,
    e.g. history items read with ``item_id``'s salts, so a behaviour and a target item
    share their representation."""

    def __init__(self, features: list[FeatureConfig], num_rows: int, dim: int,
                 device: torch.device | str | None = None,
                 extra_lookups: list[tuple[str, str, int]] = ()) -> None:
        lookups = [(f.name, p, probe_key(f.name, p)) for f in features for p in range(f.probes)]
        table = EmbeddingBagConfig(
            name=UNIFIED_TABLE, num_embeddings=num_rows, embedding_dim=dim,
            feature_names=[key for _, _, key in lookups] + [key for key, _, _ in extra_lookups],
            pooling=PoolingType.MEAN,
        )
        super().__init__(features, dim, [table], lookups, device)
        self.num_rows = num_rows
        self._mixed_salts = {(f, p): hashing.mixed_salt(f, p) for f, p, _ in lookups}
        self.extra_keys = [key for key, _, _ in extra_lookups]
        self.extra_lookups = [(self.features.index(f), f, p) for _, f, p in extra_lookups]

    def rows(self, feature_index: int, probe: int, values: torch.Tensor) -> torch.Tensor:
        salt = self._mixed_salts[(self.features[feature_index], probe)]
        return hashing.hash_rows(values, salt, self.num_rows)

    def key_rows(self, keys: list[tuple[int, int]], values: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # one hash over every key's values, each value XORed with its key's salt: about ten
        # int64 ops per batch instead of ten per key (DARE has k x probes keys)
        # (on the values' device: a CPU salt against CUDA ids fails the XOR)
        salts = torch.tensor([self._mixed_salts[(self.features[f], p)] for f, p in keys], dtype=torch.int64,
                             device=values.device)
        per_value_salts = salts.repeat_interleave(torch.tensor(counts, device=values.device), output_size=len(values))
        return hashing.hash_rows(values, per_value_salts, self.num_rows)


class HashedEmbedding(_LookupEmbedding):
    """One hashed table per feature, ``probes * dim`` wide, rows from ``rows_per_feature``."""

    def __init__(self, features: list[FeatureConfig], rows_per_feature: dict[str, int], dim: int,
                 device: torch.device | str | None = None) -> None:
        tables = [EmbeddingBagConfig(name=f"hashed__{f.name}", num_embeddings=rows_per_feature[f.name],
                                     embedding_dim=f.probes * dim, feature_names=[f.name],
                                     pooling=PoolingType.MEAN) for f in features]
        super().__init__(features, dim, tables, [(f.name, 0, f.name) for f in features], device)
        self.rows_per_feature = [rows_per_feature[f.name] for f in features]
        self._mixed_salts = [hashing.mixed_salt(f.name, 0) for f in features]

    def rows(self, feature_index: int, probe: int, values: torch.Tensor) -> torch.Tensor:
        return hashing.hash_rows(values, self._mixed_salts[feature_index], self.rows_per_feature[feature_index])


class FullVocabEmbedding(_LookupEmbedding):
    """One row per known value of each feature; unknown values share row 0."""

    def __init__(self, features: list[FeatureConfig], vocabularies: dict[str, torch.Tensor], dim: int,
                 device: torch.device | str | None = None) -> None:
        tables = [EmbeddingBagConfig(name=f"full__{f.name}", num_embeddings=len(vocabularies[f.name]) + 1,
                                     embedding_dim=f.probes * dim, feature_names=[f.name],
                                     pooling=PoolingType.MEAN) for f in features]
        super().__init__(features, dim, tables, [(f.name, 0, f.name) for f in features], device)
        for i, f in enumerate(features):
            vocabulary = torch.as_tensor(vocabularies[f.name], dtype=torch.int64).sort().values
            self.register_buffer(f"vocabulary_{i}", vocabulary)

    def rows(self, feature_index: int, probe: int, values: torch.Tensor) -> torch.Tensor:
        vocabulary = getattr(self, f"vocabulary_{feature_index}")
        if len(vocabulary) == 0:
            return torch.zeros_like(values)
        position = torch.searchsorted(vocabulary, values).clamp(max=len(vocabulary) - 1)
        return torch.where(vocabulary[position] == values, position + 1, torch.zeros_like(position))


def _equal_hashed_rows(features: list[FeatureConfig], vocab_sizes: dict[str, int], dim: int,
                       budget: int) -> dict[str, int]:
    """The floor of ``hashed_rows_for_budget``: the same row count r for every feature, capped
    at its vocabulary + 1, r the largest whose parameters fit ``budget``."""
    def cost(r: int) -> int:
        return sum(min(vocab_sizes[f.name] + 1, r) * f.probes * dim for f in features)

    lo, hi = 1, max(vocab_sizes[f.name] + 1 for f in features)
    if cost(lo) > budget:
        raise ValueError(f"a budget of {budget} parameters cannot give every feature one row")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
    return {f.name: min(vocab_sizes[f.name] + 1, lo) for f in features}


def hashed_rows_for_budget(features: list[FeatureConfig], vocab_sizes: dict[str, int], dim: int,
                           budget_rows: int) -> dict[str, int]:
    """Share a budget of ``budget_rows * dim`` parameters over per-feature hashed tables.

    Feature f's row costs ``probes_f * dim`` parameters. The rule:

    1. Floor: every feature first gets the same row count r, capped at its
       vocabulary + 1, r the largest that fits (so a tiny vocabulary such as
       gender does not take rows it cannot use). ValueError when the budget
       cannot give every feature one row.
    2. Proportional share: rows_f = max(floor_f, s * (vocab_f + 1)) with one
       scale s for all features, the largest that fits: a feature above its
       floor gets a share of the budget proportional to
       ``(vocab_f + 1) * probes_f * dim`` (as the per-feature tables of TFRS
       peers are sized). s may exceed 1: a budget larger than
       ``sum((vocab_f + 1) * probes_f * dim)`` is spent too, the leftover going
       to the tables in proportion to their vocabularies, since a hashed table
       with more rows than values still collides (birthday bound) and more rows
       collide less.
    3. Integer rows: the real rows are rounded down, then features take one more
       row in order of their dropped fraction (largest first, larger vocabulary
       on ties) until the next one does not fit.

    So no feature gets fewer rows than the equal split gives, a larger
    vocabulary never gets fewer rows (equal ones may differ by the rounding
    row), the parameters never exceed the budget, and less than
    ``max probes * dim`` parameters (one row of the widest table) is left
    unspent. Below ``sum((vocab_f + 1) * probes_f * dim)`` the floor binds for
    the large tables and this is the equal split plus its rounding slack; the
    proportional share shows above it.
    """
    budget = budget_rows * dim
    floor = _equal_hashed_rows(features, vocab_sizes, dim, budget)
    cost = {f.name: f.probes * dim for f in features}
    size = {f.name: vocab_sizes[f.name] + 1 for f in features}
    # water-filling for s: features whose floor exceeds s * size stay at the floor
    free = {f.name for f in features}
    scale = Fraction(0)
    while free:
        fixed = sum(floor[n] * cost[n] for n in cost if n not in free)
        scale = Fraction(budget - fixed, sum(size[n] * cost[n] for n in free))
        held = {n for n in free if scale * size[n] < floor[n]}
        if not held:
            break
        free -= held
    exact = {n: max(Fraction(floor[n]), scale * size[n]) for n in cost}
    rows = {n: math.floor(exact[n]) for n in cost}
    left = budget - sum(rows[n] * cost[n] for n in cost)
    for n in sorted(cost, key=lambda n: (exact[n] - rows[n], size[n]), reverse=True):
        if exact[n] == rows[n] or cost[n] > left:
            break
        rows[n] += 1
        left -= cost[n]
    return rows


def hashed_budget_report(features: list[FeatureConfig], rows: dict[str, int], dim: int,
                         budget_rows: int | None = None) -> dict:
    """How hashed tables spend their parameters: rows and parameters per feature, the total,
    and, given the budget (in rows of ``dim``), the budget and what is left of it."""
    parameters = {f.name: rows[f.name] * f.probes * dim for f in features}
    report = {"rows": {f.name: rows[f.name] for f in features}, "parameters": parameters,
              "total_parameters": sum(parameters.values())}
    if budget_rows is not None:
        report["budget_parameters"] = budget_rows * dim
        report["unspent_parameters"] = budget_rows * dim - report["total_parameters"]
    return report


def build_embedding(kind: str, features: list[FeatureConfig], dim: int, num_rows: int,
                    vocabularies: dict[str, torch.Tensor], device: torch.device | str | None = None,
                    extra_lookups: list[tuple[str, str, int]] = ()) -> _LookupEmbedding:
    """The embedding layer a config names, from the same feature spec."""
    if kind == "unified":
        return UnifiedEmbedding(features, num_rows, dim, device, extra_lookups)
    if extra_lookups:
        raise ValueError("extra lookups (history items) need the unified table")
    if kind == "hashed":
        sizes = {name: len(v) for name, v in vocabularies.items()}
        return HashedEmbedding(features, hashed_rows_for_budget(features, sizes, dim, num_rows), dim, device)
    if kind == "full":
        return FullVocabEmbedding(features, vocabularies, dim, device)
    raise ValueError(f"unknown embedding kind {kind!r}; choose unified, hashed or full")


# --- plain-PyTorch reference of the unified lookup, for the agreement test ---


def unified_lookup_reference(weight: torch.Tensor, features: list[FeatureConfig],
                             raw_values: dict[str, list[list[int]]]) -> torch.Tensor:
    """Loop-by-loop unified embedding: for each example, feature and probe, hash every
    raw id with the pure-Python hash, mean the rows, concatenate. ``raw_values[f][b]``
    is example b's list of raw ids for feature f."""
    num_rows, dim = weight.shape
    batch_size = len(next(iter(raw_values.values())))
    out = []
    for b in range(batch_size):
        parts = []
        for f in features:
            ids = raw_values[f.name][b]
            for p in range(f.probes):
                if not ids:
                    parts.append(torch.zeros(dim, dtype=weight.dtype))
                    continue
                rows = [hashing.hash_row_reference(v, f.name, p, num_rows) for v in ids]
                parts.append(torch.stack([weight[r] for r in rows]).mean(dim=0))
        out.append(torch.cat(parts))
    return torch.stack(out)
