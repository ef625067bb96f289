"""How a data set's columns are stored in the feature store: each column's Feast type, the column
converted to it, and UTC stamps as integer microseconds. The load writes with these, and the
event log turns streamed events into the same columns."""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.schema import value_text


def microseconds(stamps: pd.Series) -> np.ndarray:
    """UTC timestamps as integer microseconds since the epoch."""
    return stamps.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[us]").astype(np.int64)


def feast_type(column: pd.Series, kind: str) -> str:
    """The Feast type a column is stored as: Int64 / String for categorical values (integers
    stay integers), Array(...) for list cells, Float32 for numeric ones."""
    if kind == "numeric":
        return "Float32"
    present = column.dropna()
    if len(present) and isinstance(present.iloc[0], (list, tuple, np.ndarray)):
        flat = [v for cell in present for v in cell]
        return "Array(Int64)" if all(_is_integer(v) for v in flat) else "Array(String)"
    return "Int64" if len(present) and all(_is_integer(v) for v in present.unique()) else "String"


def _is_integer(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


def stored_column(column: pd.Series, type_name: str):
    """A column converted to its Feast type."""
    if type_name == "Float32":
        return pd.to_numeric(column, errors="coerce").astype("float32")
    if type_name == "Int64":
        return column.astype("float64").astype("Int64") if column.dtype == object else column.astype("Int64")
    if type_name == "String":
        return column.map(value_text).astype(object)
    element = int if type_name == "Array(Int64)" else value_text
    return column.map(lambda cell: [element(v) for v in cell] if isinstance(cell, (list, tuple, np.ndarray)) else [])
