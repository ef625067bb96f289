"""Warnings of the libraries plexrec calls that are known to be harmless here, silenced at the call.

Each is listed with why it does not apply; anything not listed is still shown. The
filters hold only inside ``silenced(...)``, around the plexrec calls that cause them:

    torchrec_calls()   recsys/train.py: sharding plan, DistributedModelParallel, checkpoints, export

``silenced`` and the Feast list are the data side's (features/known_warnings.py).
"""

from __future__ import annotations

from features.known_warnings import silenced

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


def torchrec_calls():
    return silenced(TORCHREC_LOGS, TORCHREC_WARNINGS)
