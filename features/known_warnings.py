"""Warnings of the libraries the data side calls that are known to be harmless here, silenced at the call.

Each is listed with why it does not apply; anything not listed is still shown. The filters
hold only inside ``silenced(...)``, around the plexrec calls that cause them:

    feast_calls()      features/load.py (materialize), features/training.py (point-in-time join)

recsys/known_warnings.py lists TorchRec's, with the same ``silenced``. No torch import here.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (category, start of the message, why it is harmless)
FEAST_WARNINGS = [
    (DeprecationWarning, "fetch_arrow_table() is deprecated",
     "ibis, under Feast's DuckDB offline store; results are the same"),
]


class _DropKnown(logging.Filter):
    def __init__(self, prefixes: list[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


@contextmanager
def silenced(logs: list[tuple[str, str, str]], warning_list: list[tuple[type[Warning], str, str]]) -> Iterator[None]:
    """Within the block, drop exactly these log records and warnings."""
    by_logger: dict[str, list[str]] = {}
    for logger_name, prefix, _ in logs:
        by_logger.setdefault(logger_name, []).append(prefix)
    filters = [(logging.getLogger(name), _DropKnown(prefixes)) for name, prefixes in by_logger.items()]
    for logger, known in filters:
        logger.addFilter(known)
    try:
        with warnings.catch_warnings():
            for category, prefix, _ in warning_list:
                warnings.filterwarnings("ignore", message=_escape(prefix), category=category)
            yield
    finally:
        for logger, known in filters:
            logger.removeFilter(known)


def _escape(prefix: str) -> str:
    return re.escape(prefix)


def feast_calls():
    return silenced([], FEAST_WARNINGS)
