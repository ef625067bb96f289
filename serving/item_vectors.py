"""What a model version reads of an item that does not depend on the user, kept per item.

An item's feature columns, dense values, attention vector A_item(x) and
representation R(x) (recsys/inference.py) are computed the first time the item
is scored and kept in rows of preallocated tensors, so a call gathers its
candidates' rows with one index op. A ServingModel owns one cache: a new model
version starts an empty one.

An entry is valid while the item's features are the very ``ItemFeatures`` object
it was computed from: the online item cache (features/online.py) hands out the
same object until it reads the item again (its TTL, a new model version), so a
changed profile or count reaches the model as soon as the store's value does.

Bounded: at most ``max_items`` rows, least recently used replaced first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from features.online import ItemFeatures

DEFAULT_MAX_ITEMS = 100_000
_FIRST_CAPACITY = 1024
_FREE = np.iinfo(np.int64).max  # the last use of a free row: never chosen to be evicted


class ItemVectorCache:
    """Item id -> a row of ``width`` floats per part (e.g. columns+dense, attention, representation).

    ``compute(items)`` gives, for a list of items, one [n, width] tensor per part.

    A row is found by the identity of the ``ItemFeatures`` it was computed from (``id()``; the
    cache holds the object, so its id cannot be reused while the row lives): a call's few hundred
    lookups are one ``map`` over a dict and one numpy store of their last use, no Python loop per
    item (that loop was half of a call's input building, measured: docs/benchmarks.md).
    """

    def __init__(self, compute: Callable[[list[ItemFeatures]], list[torch.Tensor]], widths: list[int],
                 max_items: int = DEFAULT_MAX_ITEMS) -> None:
        if max_items < 1:
            raise ValueError(f"the item vector cache needs room for one item, got {max_items}")
        self.compute, self.max_items = compute, max_items
        capacity = min(_FIRST_CAPACITY, max_items)
        self.parts = [torch.zeros(capacity, width) for width in widths]
        self._row_of_object: dict[int, int] = {}  # id(features) -> row
        self._row_of_item: dict[int, int] = {}  # item id -> the row of its latest features
        self._features: list[ItemFeatures | None] = [None] * capacity  # per row: what it was computed from
        self._last_used = np.full(capacity, _FREE, dtype=np.int64)  # per row: the lookup that last read it
        self._lookups = 0
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._lock = threading.Lock()
        self.computed = self.replaced = 0  # items computed (first sight or changed features), rows reused

    def __len__(self) -> int:
        return len(self._row_of_item)

    def slots(self, items: list[ItemFeatures]) -> torch.Tensor:
        """[n] the rows of ``items`` in ``parts``, computing those not (or no longer) cached."""
        with self._lock:
            rows = list(map(self._row_of_object.get, map(id, items)))
            self._lookups += 1
            if None in rows:
                hits = np.array([row for row in rows if row is not None], dtype=np.int64)
                self._last_used[hits] = self._lookups  # this lookup's hits are not evicted for its misses
                self._fill(items, rows)
            index = np.array(rows, dtype=np.int64)
            self._last_used[index] = self._lookups
            return torch.from_numpy(index)

    def _fill(self, items: list[ItemFeatures], rows: list[int | None]) -> None:
        # an item twice in one list (a history repeats items) is computed once
        first: dict[int, ItemFeatures] = {}
        for row, item in zip(rows, items):
            if row is None:
                first.setdefault(item.item_id, item)
        distinct = len({item.item_id for item in items})
        if distinct > self.max_items:  # else evicting could take a row this lookup reads
            raise ValueError(f"{distinct} distinct items in one lookup; the item vector cache holds {self.max_items} "
                             "(--item-cache-entries)")
        new = list(first.values())
        vectors = self.compute(new)
        for item in new:  # an item whose features changed: its old row is free
            old = self._row_of_item.pop(item.item_id, None)
            if old is not None:
                self._release(old)
        self._make_room(len(new))
        placed = [self._free.pop() for _ in new]
        for item, row in zip(new, placed):
            self._row_of_item[item.item_id] = row
            self._row_of_object[id(item)] = row
            self._features[row] = item
        index = torch.tensor(placed, dtype=torch.int64)
        for part, values in zip(self.parts, vectors):
            part[index] = values
        self.computed += len(new)
        where = dict(zip(first, placed))
        for position, item in enumerate(items):  # also an older object of a recomputed item: its latest row
            rows[position] = where.get(item.item_id, rows[position])

    def _release(self, row: int) -> None:
        del self._row_of_object[id(self._features[row])]
        self._features[row] = None
        self._last_used[row] = _FREE
        self._free.append(row)

    def _make_room(self, needed: int) -> None:
        """Grow the tensors (doubling, up to max_items rows), then evict the least recently used rows
        (this lookup's hits were just stamped: they go last)."""
        capacity = len(self.parts[0])
        if len(self._free) < needed and capacity < self.max_items:
            grown = min(self.max_items, max(2 * capacity, capacity + needed))
            self.parts = [torch.cat([part, part.new_zeros(grown - capacity, part.shape[1])]) for part in self.parts]
            self._features.extend([None] * (grown - capacity))
            self._last_used = np.concatenate([self._last_used, np.full(grown - capacity, _FREE, dtype=np.int64)])
            self._free.extend(range(grown - 1, capacity - 1, -1))
        short = needed - len(self._free)
        if short > 0:
            for row in np.argpartition(self._last_used, short - 1)[:short].tolist():
                del self._row_of_item[self._features[row].item_id]
                self._release(row)
            self.replaced += short
