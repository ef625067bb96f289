"""Raw ids of categorical cells: the rule the store, the ingester, training and serving share.

Integers are their own id; a string that spells an integer ("85") is that integer, so a CSV
column and the same column typed in Parquet give the same ids; any other string becomes
``string_to_id`` = fnv1a64 of its UTF-8 bytes with the top bit cleared (pinned by golden
values in tests/test_hashing.py). The model hashes raw ids into its tables itself
(recsys/hashing.py). Plain Python: no torch, so the ingester can use it.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

_MASK64 = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3


def fnv1a64(data: bytes) -> int:
    """64-bit FNV-1a of ``data`` as an unsigned Python int."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return h


def string_to_id(value: str) -> int:
    """A stable non-negative int64 id for a categorical string value."""
    return fnv1a64(value.encode("utf-8")) & ((1 << 63) - 1)


def value_to_id(value) -> int:
    """The raw id of one categorical value.

    Integers are their own id; so is a string that spells an integer ("85"), so a
    CSV column and the same column typed in Parquet give the same ids. Any other
    string goes through ``string_to_id``.
    """
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    text = str(value)
    if _INTEGER.fullmatch(text):
        return int(text)
    return string_to_id(text)


_INTEGER = re.compile(r"-?[0-9]{1,18}")


def cell_values(cell, separator: str | None) -> list:
    """The values of one multi-valued cell: a list as it is, a string split on ``separator``,
    nothing for a missing or empty cell."""
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return []
    if isinstance(cell, str):
        return [] if cell == "" else cell.split(separator) if separator else [cell]
    if isinstance(cell, (list, tuple, np.ndarray)):
        return list(cell)
    return [cell]


def cell_ids(cell, separator: str | None = None, multi_valued: bool = False) -> list[int]:
    """The raw ids of one cell, as features/examples.py converts whole columns: a single-valued
    cell is one id (none when missing), a multi-valued one is ``cell_values``' ids."""
    if multi_valued:
        return [value_to_id(v) for v in cell_values(cell, separator)]
    return [] if cell is None or pd.isna(cell) else [value_to_id(cell)]
