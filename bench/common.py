"""What every benchmark shares: where results go, the machine line, mean ± std tables."""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine() -> str:
    import torch
    return f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: str | Path, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


def summarise(runs: list[dict], group_keys: list[str], metrics: list[str]) -> list[dict]:
    """Mean and sample standard deviation of ``metrics`` per group, groups in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in group_keys), []).append(run)
    summary = []
    for key, group in groups.items():
        row = {**dict(zip(group_keys, key)), "seeds": len(group)}
        for metric in metrics:
            values = np.array([r[metric] for r in group if r.get(metric) is not None], dtype=float)
            if len(values):
                row[metric] = {"mean": float(values.mean()),
                               "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
        summary.append(row)
    return summary


def cell(row: dict, metric: str) -> str:
    value = row.get(metric)
    return f"{value['mean']:.4f} ± {value['std']:.4f}" if value else "—"


def subsample_users(examples, users: int, seed: int = 0):
    """The examples of ``users`` users drawn at random (all of them when 0 or more than there are)."""
    import numpy as np

    ids = np.unique(examples.user_id)
    if not users or users >= len(ids):
        return examples
    keep = np.random.default_rng(seed).choice(ids, users, replace=False)
    return examples.subset(np.flatnonzero(np.isin(examples.user_id, keep)))
