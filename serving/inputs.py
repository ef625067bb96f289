"""Online features of users and their candidates, and the call's context -> the model's inputs.

Two builders, one set of rules:

- ``InputBuilder`` (what the server runs): reads each cell where the online store
  keeps it and converts it with training's own per-cell rules
  (``recsys.data.examples.cell_ids``, ``signed_log1p``, log1p of the counters) into
  the tensors of recsys/inference.py, with numpy and lists, no pandas; an item's
  vectors are computed once per model version (serving/item_vectors.py).
- ``model_batch`` (the reference): lays the rows out as the point-in-time join's
  rows and sends them through ``features.examples.examples_from_feature_rows`` and
  ``recsys.data.batching.make_batch``, the code training uses, into the exported
  Ranker's KJT. tests/test_inference.py holds the two to the same raw ids, dense
  values and scores on every shipped schema, so serving's conversion cannot drift
  from training's.

Cold-start defaults are the values training gives a missing cell: an unknown user
or item has no profile values (categorical and multi-valued features: an empty
bag; numeric ones: missing, i.e. 0 after ``numeric_values``; the category:
NO_CATEGORY), an empty history and zero counts; a context feature the call does
not send is missing in the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from features.examples import category_id, examples_from_feature_rows
from features.online import ItemFeatures, UserFeatures
from recsys.data.batching import Batch, make_batch
from features.examples import DERIVED_DENSE, signed_log1p
from features.ids import cell_ids
from features.schema import CATEGORY_FEATURE, DatasetSchema
from recsys.inference import History, InferenceRanker, Jagged
from recsys.sequence import SharedHistories
from serving.item_vectors import DEFAULT_MAX_ITEMS, ItemVectorCache

SERVING_SPLIT = "test"  # a schema with a split column needs a value in every row; the model never reads it


class InvalidContext(ValueError):
    """A context value that is not what its feature declares; ``field`` names it (context.<key>)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def request_context(schema: DatasetSchema, context: Mapping[str, str]) -> dict[str, Any]:
    """The schema's context features of one call (ScoreRequest.context): categorical and
    multi-valued ones as the text given (training's raw ids come from the same text), numeric
    ones as numbers. Keys the schema does not declare are not model inputs and are left out;
    so are empty values (a proto3 string cannot be null: "" means no value)."""
    group = schema.context
    values: dict[str, Any] = {name: context[name] for name in [*group.categorical, *group.multi_valued]
                              if context.get(name)}
    for name in group.numeric:
        text = context.get(name)
        if not text:
            continue
        try:
            number = float(text)
        except ValueError:
            raise InvalidContext(f"context.{name}", f"is a numeric feature; {text!r} is not a number") from None
        if not math.isfinite(number):
            raise InvalidContext(f"context.{name}", f"is a numeric feature; {text!r} is not a finite number")
        values[name] = number
    return values


def _typed(schema: DatasetSchema, column: str, values: list) -> pd.Series:
    """One feature's cells as the point-in-time join types them: numeric as float (missing: NaN),
    the others as objects (ids stay exact int64, lists stay lists, missing stays None)."""
    if column in schema.numeric:
        return pd.Series([np.nan if v is None else v for v in values], dtype="float64")
    return pd.Series(values, dtype=object)


def feature_rows(schema: DatasetSchema, user: UserFeatures, items: list[ItemFeatures],
                 now_seconds: int | None = None, history_length: int = 0) -> pd.DataFrame:
    """One feature row per candidate, as the ``ranker`` feature service's join returns it, with
    the user's ``history_length`` most recent items (what the model reads: make_batch would cut
    a longer one to that anyway; 0 for a model without history or given shared histories)."""
    now_seconds = int(time.time()) if now_seconds is None else now_seconds
    n = len(items)
    history = user.history_item_ids[-history_length:] if history_length else []
    stamps = user.history_timestamps[-history_length:] if history_length else []
    columns: dict[str, Any] = {
        "user_id": np.full(n, user.user_id, dtype=np.int64),
        "item_id": np.array([i.item_id for i in items], dtype=np.int64),
        "timestamp": np.full(n, now_seconds * schema.units_per_second, dtype=np.int64),
        schema.rating or schema.label: np.zeros(n),  # no label at serving time
        "user_interaction_count": np.full(n, user.interaction_count, dtype=np.int64),
        "item_interaction_count": np.array([i.interaction_count for i in items], dtype=np.int64),
        "history_item_ids": [history] * n,
        "history_timestamps": [stamps] * n,
    }
    if schema.split:
        columns[schema.split] = [SERVING_SPLIT] * n
    for column in schema.users.columns:
        columns[column] = _typed(schema, column, [user.profile.get(column)] * n)
    for column in schema.items.columns:
        columns[column] = _typed(schema, column, [i.profile.get(column) for i in items])
    for column in schema.context.columns:
        columns[column] = _typed(schema, column, [user.context.get(column)] * n)
    if schema.category:
        columns[CATEGORY_FEATURE] = pd.Series([i.category for i in items], dtype=object)
    return pd.DataFrame(columns)


def model_batch(schema: DatasetSchema, requests: list[tuple[UserFeatures, list[ItemFeatures]]],
                history_items: dict[int, ItemFeatures], feature_names: list[str], history_length: int,
                share_histories: bool = False, now_seconds: int | None = None,
                dense_names: list[str] | None = None) -> tuple[Batch, SharedHistories | None]:
    """One batch for several (user, candidates) requests, rows in request order then candidate
    order; ``history_items`` gives the categories of the users' history items (a sequence
    model reads them).

    ``share_histories``: each user's history goes into SharedHistories once instead of into
    every candidate row (same model output, tested; the search then reads G x L behaviours,
    not B x L). The batch's history keys are left out then. ``dense_names``: the dense features
    the model reads (its manifest's; None: all the schema gives).
    """
    now_seconds = int(time.time()) if now_seconds is None else now_seconds
    share = share_histories and history_length > 0
    rows = pd.concat([feature_rows(schema, user, items, now_seconds, 0 if share else history_length)
                      for user, items in requests], ignore_index=True)
    categories = {item_id: item.category for item_id, item in history_items.items()}
    examples = examples_from_feature_rows(rows, schema, item_categories=categories).keep_dense(dense_names)
    # examples come sorted by user (stable, one timestamp): find each request row's place
    order = np.argsort(rows["user_id"].to_numpy(), kind="stable")
    place = np.empty_like(order)
    place[order] = np.arange(len(order))
    batch = make_batch(examples, place, feature_names, 0 if share else history_length)
    if not share:
        return batch, None
    # the most recent history_length items, oldest first, and their categories: what make_batch
    # and examples_from_feature_rows give each row
    histories = [user.history_item_ids[-history_length:] for user, _ in requests]
    items = np.array([i for history in histories for i in history], dtype=np.int64)
    shared_categories = None
    if schema.category:
        category_ids = {i: category_id(categories.get(i)) for i in set(items.tolist())}
        shared_categories = torch.tensor([category_ids[i] for i in items.tolist()], dtype=torch.int64)
    shared = SharedHistories(
        items=torch.from_numpy(items), categories=shared_categories,
        lengths=torch.tensor([len(history) for history in histories], dtype=torch.int64),
        row_group=torch.from_numpy(np.repeat(np.arange(len(requests)), [len(items) for _, items in requests])))
    return batch, shared


# --- the fast path: requests -> recsys.inference.InferenceRanker inputs, numpy over the store's rows ---


@dataclass
class ScoringInputs:
    """One batch of calls as the inference ranker reads it (rows in call order, then candidate order)."""

    user_part: torch.Tensor  # [G, user part]
    item_columns: torch.Tensor  # [B, item feature columns]
    item_dense: torch.Tensor  # [B, item dense]
    row_group: torch.Tensor  # [B] the call of each row
    history: History | None
    item_attention: torch.Tensor | None  # [B, d_a]
    item_representation: torch.Tensor | None  # [B, d_r]


def _reader(schema: DatasetSchema, name: str) -> Callable[[Any], Any]:
    """How a feature's cell is read from UserFeatures (user and context features) or ItemFeatures:
    where serving finds the column the point-in-time join gives training."""
    if name == "user_id":
        return lambda user: user.user_id
    if name == "item_id":
        return lambda item: item.item_id
    if name == CATEGORY_FEATURE:  # always one id: NO_CATEGORY where unknown, as training's rows have it
        return lambda item: category_id(item.category)
    group = schema.group_of(name)
    if group == "context":
        return lambda user: user.context.get(name)
    return lambda entity: entity.profile.get(name)


def _dense_reader(schema: DatasetSchema, name: str) -> Callable[[Any], float]:
    """A dense input's value before sign-log scaling: the counters of training's rows, or the numeric cell."""
    if name in DERIVED_DENSE:
        return lambda entity: entity.interaction_count
    read = _reader(schema, name)
    return lambda entity: 0.0 if (value := read(entity)) is None else float(value)


class InputBuilder:
    """Requests -> ScoringInputs for one model version, its item vectors kept in an ItemVectorCache.

    The cells are read and converted by training's own rules (recsys.data.examples.cell_ids,
    signed_log1p, log1p of counts): tests/test_inference.py checks the raw ids and dense values
    against the pandas path (``model_batch``, training's conversion) on the same rows.
    """

    def __init__(self, schema: DatasetSchema, ranker: InferenceRanker, history_length: int,
                 max_cached_items: int = DEFAULT_MAX_ITEMS, model_version: str | None = None) -> None:
        """``model_version``: the version this builder serves (for the record). An item's vectors are
        always the model's, computed from the item's online features: published ones (``plexrec
        features publish``) are never read, so a vector published from another profile than the one
        the server reads (the offline one, before the stream changed the item) cannot score it."""
        self.schema, self.ranker, self.history_length = schema, ranker, history_length
        self.model_version = model_version
        self.reads_category = ranker.space is not None and schema.category is not None

        def readers(lookups) -> list[tuple[str, Callable, str | None, bool]]:
            return [(lookup.name, _reader(schema, lookup.name), schema.multi_valued.get(lookup.name),
                     lookup.name in schema.multi_valued) for lookup in lookups]

        self.user_readers, self.item_readers = readers(ranker.user_lookups), readers(ranker.item_lookups)
        self.user_dense = [(_dense_reader(schema, n), n in DERIVED_DENSE) for n in ranker.user_dense_names]
        self.item_dense = [(_dense_reader(schema, n), n in DERIVED_DENSE) for n in ranker.item_dense_names]
        probe = ranker.items(self._ids(self.item_readers, [ItemFeatures(item_id=0)]),
                             self._categories([ItemFeatures(item_id=0)]), 1)
        self.columns_width = probe.columns.shape[1]
        widths = [self.columns_width + len(self.item_dense)]
        widths += [v.shape[1] for v in (probe.attention, probe.representation) if v is not None]
        self.item_vectors = ItemVectorCache(self._item_rows, widths, max_cached_items)

    @staticmethod
    def _ids(readers, entities: list, as_lists: bool = False) -> dict[str, Jagged]:
        """Each feature's raw ids of ``entities``; ``as_lists``: as Python lists (the user side: a few
        values, which the ranker hashes as Python ints), else as tensors."""
        ids = {}
        for name, read, separator, multi in readers:
            cells = [cell_ids(read(entity), separator, multi) for entity in entities]
            values, lengths = [v for c in cells for v in c], [len(c) for c in cells]
            ids[name] = (values, lengths) if as_lists else (torch.tensor(values, dtype=torch.int64),
                                                            torch.tensor(lengths, dtype=torch.int64))
        return ids

    @staticmethod
    def _dense(readers, entities: list) -> torch.Tensor:
        values = np.array([[read(entity) for read, _ in readers] for entity in entities], dtype=np.float64)
        values = values.reshape(len(entities), len(readers))
        counts = np.array([is_count for _, is_count in readers], dtype=bool)
        dense = np.where(counts, np.log1p(np.where(counts, values, 0)), signed_log1p(values)).astype(np.float32)
        return torch.from_numpy(dense)

    def _categories(self, items: list[ItemFeatures]) -> torch.Tensor | None:
        if not self.reads_category:
            return None
        return torch.tensor([category_id(item.category) for item in items], dtype=torch.int64)

    def _item_rows(self, items: list[ItemFeatures]) -> list[torch.Tensor]:
        vectors = self.ranker.items(self._ids(self.item_readers, items), self._categories(items), len(items))
        parts = [torch.cat([vectors.columns, self._dense(self.item_dense, items)], dim=1)]
        parts += [v for v in (vectors.attention, vectors.representation) if v is not None]
        return parts

    def batch(self, requests: list[tuple[UserFeatures, list[ItemFeatures]]],
              history_items: dict[int, ItemFeatures]) -> ScoringInputs:
        users = [user for user, _ in requests]
        user_part = self.ranker.user_part(self._ids(self.user_readers, users, as_lists=True),
                                          self._dense(self.user_dense, users))
        candidates = [item for _, items in requests for item in items]
        cache = self.item_vectors
        slots = cache.slots(candidates)
        item_part = cache.parts[0][slots]
        row_group = torch.from_numpy(np.repeat(np.arange(len(requests)), [len(items) for _, items in requests]))
        history = attention = representation = None
        if self.ranker.mode != "none":
            attention, representation = self._sequence_vectors(slots)
            history = self._history(users, history_items)
        return ScoringInputs(user_part, item_part[:, :self.columns_width], item_part[:, self.columns_width:],
                             row_group, history, attention, representation)

    def _history(self, users: list[UserFeatures], history_items: dict[int, ItemFeatures]) -> History:
        """Each user's ``history_length`` most recent behaviours as cached item vectors, padded to [G, L]."""
        histories = [user.history_item_ids[-self.history_length:] for user in users]
        lengths = torch.tensor([len(h) for h in histories], dtype=torch.int64)
        longest = int(lengths.max()) if len(lengths) else 0
        behaviours = [history_items.get(i) or ItemFeatures(item_id=i) for h in histories for i in h]
        flat = self.item_vectors.slots(behaviours) if behaviours else torch.zeros(0, dtype=torch.int64)
        if len(histories) == 1:  # one call: its history is the padded block
            padded = flat.view(1, -1)
        else:
            padded = torch.zeros(len(histories), longest, dtype=torch.int64)
            padded[torch.arange(longest) < lengths.unsqueeze(1)] = flat
        return History(*self._sequence_vectors(padded), lengths)

    def _sequence_vectors(self, slots: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(A_item, R) of the cached items at ``slots`` (any shape), each None where the mode reads none:
        A for dare and coupled (a searching space), R for dare and mean (coupled represents by A)."""
        parts = [part[slots] for part in self.item_vectors.parts[1:]]
        attention = parts[0] if self.ranker.space is not None else None
        representation = parts[-1] if self.ranker.mode != "coupled" else None
        return attention, representation
