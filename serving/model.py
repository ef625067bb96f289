"""The model serving runs: an exported artifact, checked, plus the newest-version watcher.

Loading goes through ``recsys.export.load_model`` (safetensors + JSON manifest,
never pickle). An artifact is refused unless its manifest names only features
the online store supplies and a cold-start batch scores to finite numbers, so a
broken or incompatible model never replaces one that works.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from features.online import ItemFeatures, UserFeatures
from recsys.config import RunConfig
from recsys.data.batching import Batch, model_inputs
from recsys.export import MANIFEST_FILE, ModelArtifactError, latest_model_dir, load_model
from recsys.sequence import SharedHistories
from serving.inputs import SERVABLE_DENSE, SERVABLE_FEATURES, model_batch

log = logging.getLogger("plexrec.serving.model")


@dataclass(frozen=True)
class ServingModel:
    model: torch.nn.Module
    manifest: dict[str, Any]
    directory: Path
    input_features: list[str]  # the KJT keys it reads, as training decided them
    history_length: int
    shares_histories: bool  # its sequence block takes one history per user (dare, coupled)

    @property
    def version(self) -> str:
        return self.manifest["model_version"]

    def batch(self, requests: list[tuple[UserFeatures, list[ItemFeatures]]],
              history_items: dict[int, ItemFeatures]) -> tuple[Batch, SharedHistories | None]:
        return model_batch(requests, history_items, self.input_features, self.history_length, self.shares_histories)

    def probabilities(self, inputs: tuple[Batch, SharedHistories | None]) -> np.ndarray:
        batch, shared = inputs
        with torch.inference_mode():
            return torch.sigmoid(self.model(batch.dense, batch.sparse, shared)).numpy()


def load_serving_model(directory: str | Path) -> ServingModel:
    """The model in ``directory``, or ModelArtifactError saying why it cannot serve."""
    directory = Path(directory)
    try:
        model, manifest = load_model(directory)
    except ModelArtifactError:
        raise
    except Exception as exc:  # a damaged artifact can fail anywhere in construction
        raise ModelArtifactError(f"{directory}: cannot be loaded ({type(exc).__name__}: {exc})") from exc
    unknown = sorted(set(f["name"] for f in manifest["features"]) - SERVABLE_FEATURES)
    if unknown:
        raise ModelArtifactError(f"{directory}: trained on features the online store does not hold: {unknown}")
    if manifest["dense_features"] != SERVABLE_DENSE:
        raise ModelArtifactError(f"{directory}: dense features {manifest['dense_features']} are not "
                                 f"{SERVABLE_DENSE}, which serving computes")
    config = RunConfig.from_dict(manifest["config"])
    input_features, history_length = model_inputs(config, sorted(SERVABLE_FEATURES))
    serving = ServingModel(model, manifest, directory, input_features, history_length,
                           shares_histories=config.sequence.mode in ("dare", "coupled"))
    cold = serving.probabilities(serving.batch([(UserFeatures(user_id=1), [ItemFeatures(item_id=1)])], {}))
    if not np.isfinite(cold).all():
        raise ModelArtifactError(f"{directory}: scores a cold-start request as {cold.tolist()}; weights damaged?")
    return serving


def _file_signature(directory: Path) -> tuple:
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in directory.iterdir() if f.is_file()))


class ModelWatcher:
    """Holds the serving model and moves to a newer exported version when one appears.

    ``path`` is a model root (versions as sub-directories, newest served) or one
    version directory (served as is, never reloaded). The current model is one
    attribute, so a request reads either the old or the new model, never a mix.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelArtifactError(f"{self.path}: no such model directory; `plexrec train` exports models to "
                                     "<out_dir>/models (e.g. runs/ml100k/models)")
        self.watching = not (self.path / MANIFEST_FILE).is_file()
        # version -> (its files' sizes and times, why): a broken artifact is not retried until its
        # files change (a version copied in non-atomically is loaded once the copy completes)
        self.refused: dict[str, tuple[tuple, str]] = {}
        self._lock = threading.Lock()
        self.current = load_serving_model(latest_model_dir(self.path) if self.watching else self.path)
        log.info("serving model %s from %s", self.current.version, self.current.directory)

    def check(self) -> bool:
        """Load the newest version if it is new; True when the served model changed."""
        if not self.watching:
            return False
        with self._lock:  # one reload at a time
            try:
                newest = latest_model_dir(self.path)
            except (ModelArtifactError, OSError) as exc:
                log.warning("model root %s unreadable, still serving %s: %s", self.path, self.current.version, exc)
                return False
            if newest.name == self.current.directory.name:
                return False
            files = _file_signature(newest)
            if newest.name in self.refused and self.refused[newest.name][0] == files:
                return False
            try:
                candidate = load_serving_model(newest)
            except ModelArtifactError as exc:
                self.refused[newest.name] = (files, str(exc))
                log.error("refused model %s, still serving %s: %s", newest.name, self.current.version, exc)
                return False
            previous, self.current = self.current, candidate
            log.info("model %s replaced %s", candidate.version, previous.version)
            return True
