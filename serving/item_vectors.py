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
from collections import OrderedDict
from collections.abc import Callable

import torch

from features.online import ItemFeatures

DEFAULT_MAX_ITEMS = 100_000
_FIRST_CAPACITY = 1024


class ItemVectorCache:
    """Item id -> a row of ``width`` floats per part (e.g. columns+dense, attention, representation).

    ``compute(items)`` gives, for a list of items, one [n, width] tensor per part.
    """

    def __init__(self, compute: Callable[[list[ItemFeatures]], list[torch.Tensor]], widths: list[int],
                 max_items: int = DEFAULT_MAX_ITEMS) -> None:
        if max_items < 1:
            raise ValueError(f"the item vector cache needs room for one item, got {max_items}")
        self.compute, self.max_items = compute, max_items
        capacity = min(_FIRST_CAPACITY, max_items)
        self.parts = [torch.zeros(capacity, width) for width in widths]
        self._slots: OrderedDict[int, tuple[int, ItemFeatures]] = OrderedDict()  # least recently used first
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._lock = threading.Lock()
        self.computed = self.replaced = 0  # items computed (first sight or changed features), rows reused

    def __len__(self) -> int:
        return len(self._slots)

    def slots(self, items: list[ItemFeatures]) -> torch.Tensor:
        """[n] the rows of ``items`` in ``parts``, computing those not (or no longer) cached."""
        with self._lock:
            rows: list[int] = []
            missing: list[int] = []  # positions in ``items``
            slots = self._slots
            for position, item in enumerate(items):
                entry = slots.get(item.item_id)
                if entry is not None and entry[1] is item:
                    slots.move_to_end(item.item_id)
                    rows.append(entry[0])
                else:
                    rows.append(-1)
                    missing.append(position)
            if missing:
                self._fill(items, missing, rows)
            return torch.tensor(rows, dtype=torch.int64)

    def _fill(self, items: list[ItemFeatures], missing: list[int], rows: list[int]) -> None:
        # an item twice in one list (a history repeats items) is computed once
        first: dict[int, int] = {}
        for position in missing:
            first.setdefault(items[position].item_id, position)
        new = [items[position] for position in first.values()]
        distinct = len({item.item_id for item in items})
        if distinct > self.max_items:  # else evicting could take a row this batch reads
            raise ValueError(f"{distinct} distinct items in one lookup; the item vector cache holds {self.max_items} "
                             "(--item-cache-entries)")
        vectors = self.compute(new)
        for item in new:
            old = self._slots.pop(item.item_id, None)
            if old is not None:
                self._free.append(old[0])
        self._make_room(len(new))
        placed = []
        for item in new:
            slot = self._free.pop()
            self._slots[item.item_id] = (slot, item)
            placed.append(slot)
        index = torch.tensor(placed, dtype=torch.int64)
        for part, values in zip(self.parts, vectors):
            part[index] = values
        self.computed += len(new)
        where = dict(zip(first, placed))
        for position in missing:
            rows[position] = where[items[position].item_id]

    def _make_room(self, needed: int) -> None:
        """Grow the tensors (doubling, up to max_items rows), then evict least recently used rows (the
        batch's own hits were just used: they go last)."""
        capacity = len(self.parts[0])
        if len(self._free) < needed and capacity < self.max_items:
            grown = min(self.max_items, max(2 * capacity, capacity + needed))
            self.parts = [torch.cat([part, part.new_zeros(grown - capacity, part.shape[1])]) for part in self.parts]
            self._free.extend(range(grown - 1, capacity - 1, -1))
        while len(self._free) < needed:
            item_id, (slot, _) = next(iter(self._slots.items()))
            del self._slots[item_id]
            self._free.append(slot)
            self.replaced += 1
