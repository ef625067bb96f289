"""Exported model directories: a manifest plus weights (what serving reads: no pickle), and the checkpoint.

    <model_dir>/manifest.json      format, model version, run config, feature spec,
                                   hash name + version, vocabulary sizes, the data set's
                                   schema and its fingerprint, metrics, time
    <model_dir>/weights.safetensors  the plain (unsharded) Ranker's state dict
    <model_dir>/checkpoint/        the training state it was exported from (the sharded
                                   weights, the optimizers' state, a learner's progress and
                                   offsets): what a learner continues from (recsys/continual.py)

Serving loads these with ``load_model``, which reads only the manifest and the
weights (no pickle), imports no training or distributed code and refuses a
manifest it does not understand; ``checkpoint/`` is torch.distributed.checkpoint's
format (its metadata is pickled), read only by a learner. A version is
written whole under a hidden name, fsynced, then renamed into place: a crash
leaves it complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from features.durable import fsync_dir, fsync_tree
from recsys import hashing
from recsys.config import RunConfig
from recsys.model import Ranker, build_ranker

MANIFEST_FORMAT = "plexrec-model"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
CHECKPOINT_DIR = "checkpoint"  # inside a version: the checkpoint it was exported from


class ModelArtifactError(ValueError):
    """An exported model directory is missing, damaged or from an incompatible version."""


def model_fingerprint(config: RunConfig, vocab_sizes: dict[str, int], dense_names: list[str]) -> str:
    """A short digest of everything that fixes the model's parameter shapes and meaning."""
    shape_defining = {
        "features": [(f.name, f.probes) for f in config.features],
        "embedding": config.embedding.__dict__,
        "model": config.model.__dict__,
        "vocab_sizes": vocab_sizes,
        "dense": dense_names,
        "hash": [hashing.HASH_NAME, hashing.HASH_VERSION],
    }
    return hashlib.sha256(json.dumps(shape_defining, sort_keys=True).encode()).hexdigest()[:16]


def export_model(model: Ranker, config: RunConfig, vocab_sizes: dict[str, int], dense_names: list[str],
                 metrics: dict[str, Any], root: str | Path, schema=None, *, checkpoint: Path | None = None,
                 move_checkpoint: bool = False) -> Path:
    """Write ``root/<version>/`` atomically (temp dir, fsync, rename, fsync of ``root``) and return it.

    ``checkpoint``: the checkpoint directory the model was exported from, carried inside the version as
    ``checkpoint/`` (copied; moved with ``move_checkpoint``, e.g. a learner's freshly written one), so
    that the version can be continued from for as long as it is kept."""
    fingerprint = model_fingerprint(config, vocab_sizes, dense_names)
    root = Path(root)
    created, version, staging = _claim_version_name(root, fingerprint)
    final = root / version
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(staging / WEIGHTS_FILE))
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "model_version": version,
        "fingerprint": fingerprint,
        "created_at": created.isoformat(),
        "hash": {"name": hashing.HASH_NAME, "version": hashing.HASH_VERSION},
        "features": [{"name": f.name, "probes": f.probes} for f in config.features],
        "dense_features": dense_names,
        "vocab_sizes": vocab_sizes,
        "config": config.to_dict(),
        # the data set's schema: serving checks that its store holds the same (features/schema.py)
        "schema": schema.to_dict() if schema is not None else None,
        "schema_fingerprint": schema.fingerprint() if schema is not None else None,
        "metrics": metrics,
    }
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    if checkpoint is not None:
        if move_checkpoint:
            os.replace(checkpoint, staging / CHECKPOINT_DIR)
        else:
            shutil.copytree(checkpoint, staging / CHECKPOINT_DIR)
    fsync_tree(staging)  # on disk before its name is: a crash after the rename never serves a hole
    os.replace(staging, final)
    fsync_dir(root)
    return final


def _claim_version_name(root: Path, fingerprint: str) -> tuple[datetime, str, Path]:
    """A version name no other export takes: its time, the name and its staging directory. A name is
    the UTC time to the millisecond and the fingerprint: to the second, a version rolled back
    (deleted) and the next export within that second had one name, and serving, which follows names,
    would not have reloaded. Two exports of one model in one millisecond: the staging directory's
    mkdir claims the name (one process wins), a published name waits for the next millisecond."""
    root.mkdir(parents=True, exist_ok=True)
    while True:
        created = datetime.now(timezone.utc)
        version = f"{created:%Y%m%dT%H%M%S}{created.microsecond // 1000:03d}-{fingerprint[:8]}"
        staging = root / f".{version}.tmp"
        if not (root / version).exists():
            try:
                staging.mkdir()
            except FileExistsError:  # another export holds this name now
                pass
            else:
                if not (root / version).exists():  # not published between the check and the mkdir
                    return created, version, staging
                staging.rmdir()
        time.sleep(0.001)


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ModelArtifactError(f"{model_dir}: no {MANIFEST_FILE}; is this an exported plexrec model directory?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelArtifactError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("format_version") != MANIFEST_VERSION:
        raise ModelArtifactError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')!r} is not "
            f"{MANIFEST_FORMAT!r} v{MANIFEST_VERSION}; export it again with this plexrec version")
    hash_spec = manifest.get("hash", {})
    if (hash_spec.get("name"), hash_spec.get("version")) != (hashing.HASH_NAME, hashing.HASH_VERSION):
        raise ModelArtifactError(
            f"{path}: trained with hash {hash_spec}, this code computes "
            f"{hashing.HASH_NAME} v{hashing.HASH_VERSION}; its embedding rows would be wrong")
    return manifest


def load_model(model_dir: str | Path) -> tuple[Ranker, dict[str, Any]]:
    """The exported model in eval mode, and its manifest."""
    manifest = read_manifest(model_dir)
    config = RunConfig.from_dict(manifest["config"])
    placeholders = {name: torch.zeros(size, dtype=torch.int64) for name, size in manifest["vocab_sizes"].items()}
    model = build_ranker(config, placeholders, len(manifest["dense_features"]))
    weights_path = Path(model_dir) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelArtifactError(f"{model_dir}: {WEIGHTS_FILE} is missing")
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except (RuntimeError, OSError) as exc:
        raise ModelArtifactError(f"{weights_path}: does not fit the manifest's model ({exc})") from None
    return model.eval(), manifest


# export_model names a version <UTC time %Y%m%dT%H%M%S and milliseconds>-<the model fingerprint's
# first 8 hex digits> (versions before 2026-12-04: to the second); fixed widths, and "-" sorts before a
# digit, so names sort as times
VERSION_NAME = re.compile(r"\d{8}T\d{6}(\d{3})?-[0-9a-f]{8}")


def version_directories(root: Path) -> tuple[list[Path], list[str]]:
    """The version directories under ``root``, oldest first, and the names of the other directories
    (``backup/``: never a candidate). Hidden ones (export's ``.<version>.tmp`` while it writes) are neither."""
    directories = sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    return ([p for p in directories if VERSION_NAME.fullmatch(p.name)],
            [p.name for p in directories if not VERSION_NAME.fullmatch(p.name)])


def latest_model_dir(root: str | Path) -> Path:
    """The newest exported version under ``root`` (versions sort by time; other directories ignored)."""
    versions, _ = version_directories(Path(root))
    if not versions:
        raise ModelArtifactError(f"{root}: holds no exported model version (YYYYMMDDTHHMMSSmmm-xxxxxxxx); "
                                 "run `plexrec train` first")
    return versions[-1]
