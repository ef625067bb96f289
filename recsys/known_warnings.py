"""Warnings of the libraries plexrec calls that are known to be harmless here, silenced at the call.

Each is listed with why it does not apply; anything not listed is still shown. The
filters hold only inside ``silenced(...)``, around the plexrec calls that cause them:

    torchrec_calls()   recsys/train.py: sharding plan, DistributedModelParallel, checkpoints, export
    feast_calls()      features/load.py (materialize), features/training.py (point-in-time join)

No torch import here: the ingester may use it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (logger, start of the message, why it is harmless)
TORCHREC_LOGS = [
    ("torchrec.distributed.planner.types", "The topology was constructed directly",
     "plexrec builds the Topology itself for CPU / gloo; TopologyFactory probes GPUs this job does not use"),
    ("torchrec.distributed.planner.storage_reservations", "There is a known issue with TorchRec's dense tensor size",
     "about dry runs; plexrec plans with materialised tensors"),
    ("torchrec.distributed.planner.enumerators", "No available compute kernels after applying user provided",
     "plexrec constrains every table to the fused kernel on purpose, so the data-parallel dense option drops out"),
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true",
     "a deprecation note inside TorchRec's own forward; plexrec does not trace"),
]
# (category, start of the message, why it is harmless)
TORCHREC_WARNINGS = [
    (FutureWarning, "HeuristicalStorageReservation is known to cause issues",
     "again about dry-run estimates; the tables here are small and planned for real"),
    (FutureWarning, "`broadcast_buffers` is deprecated", "TorchRec's own DDP wrapper; the tower has no buffers"),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor",
     "TorchRec 1.8 shards with ShardedTensor; plexrec reads its shards as TorchRec gives them"),
    (UserWarning, "torch.distributed is disabled, unavailable or uninitialized",
     "export reads a checkpoint in one process on purpose (no_dist=True)"),
]
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
    import re

    return re.escape(prefix)


def torchrec_calls():
    return silenced(TORCHREC_LOGS, TORCHREC_WARNINGS)


def feast_calls():
    return silenced([], FEAST_WARNINGS)
