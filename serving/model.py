"""The model serving runs: an exported artifact, checked against the store, plus the newest-version watcher.

Loading goes through ``recsys.export.load_model`` (safetensors + JSON manifest,
never pickle). An artifact is refused (``ModelArtifactError`` saying why) unless
it fits the feature store it would be served from (``store_meta``: the store's
store.json):

- it was trained on the schema the store holds (equal fingerprints; else the
  differences are listed), and its manifest records one at all;
- it reads no longer a history than the store keeps (a longer one would be cut
  silently, and the model would see shorter histories than in training);
- its features are the schema's, and its dense inputs are among the ones serving
  computes from the schema (DERIVED_DENSE + the schema's numeric features);
- a cold-start batch scores to finite numbers.

So a broken or incompatible model never replaces one that works.
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
from features.examples import DERIVED_DENSE
from features.schema import DatasetSchema
from recsys.export import MANIFEST_FILE, ModelArtifactError, load_model, version_directories
from recsys.inference import InferenceRanker
from recsys.model import Ranker
from recsys.sequence import SharedHistories
from serving.inputs import InputBuilder, ScoringInputs, model_batch
from serving.item_vectors import DEFAULT_MAX_ITEMS

log = logging.getLogger("plexrec.serving.model")


@dataclass(frozen=True)
class ServingModel:
    """An exported model as serving runs it: ``batch`` + ``probabilities`` on the fast path
    (recsys/inference.py, item vectors kept per version), ``eager_batch`` + ``eager_probabilities``
    on training's path (pandas rows, the TorchRec Ranker): the reference the fast one is held to."""

    model: torch.nn.Module
    manifest: dict[str, Any]
    directory: Path
    schema: DatasetSchema  # the data set's (the model's and the store's: they are checked to agree)
    input_features: list[str]  # the KJT keys it reads, as training decided them
    history_length: int
    shares_histories: bool  # its sequence block takes one history per user (dare, coupled)
    inference: InferenceRanker
    inputs: InputBuilder

    @property
    def version(self) -> str:
        return self.manifest["model_version"]

    def batch(self, requests: list[tuple[UserFeatures, list[ItemFeatures]]],
              history_items: dict[int, ItemFeatures]) -> ScoringInputs:
        with torch.inference_mode():
            return self.inputs.batch(requests, history_items)

    def probabilities(self, inputs: ScoringInputs) -> np.ndarray:
        with torch.inference_mode():
            return torch.sigmoid(self.inference(inputs.user_part, inputs.item_columns, inputs.item_dense,
                                                inputs.row_group, inputs.history, inputs.item_attention,
                                                inputs.item_representation)).numpy()

    def eager_batch(self, requests: list[tuple[UserFeatures, list[ItemFeatures]]],
                    history_items: dict[int, ItemFeatures]) -> tuple[Batch, SharedHistories | None]:
        return model_batch(self.schema, requests, history_items, self.input_features, self.history_length,
                           self.shares_histories, dense_names=self.manifest["dense_features"])

    def eager_probabilities(self, inputs: tuple[Batch, SharedHistories | None]) -> np.ndarray:
        batch, shared = inputs
        with torch.inference_mode():
            return torch.sigmoid(self.model(batch.dense, batch.sparse, shared)).numpy()


def inference_ranker(model: Ranker, schema: DatasetSchema, dense_names: list[str]) -> InferenceRanker:
    """The fast path of ``model``: user-side features and dense inputs are the users' and the call's
    context's, the rest the item's."""
    def users_side(name: str) -> bool:
        if name in DERIVED_DENSE:
            return name == DERIVED_DENSE[0]  # the user's count; DERIVED_DENSE[1] is the item's
        return schema.group_of(name) in ("users", "context")

    features = model.embedding.features
    return InferenceRanker(model, [f for f in features if users_side(f)], [f for f in features if not users_side(f)],
                           dense_names, [n for n in dense_names if users_side(n)])


def load_serving_model(directory: str | Path, store_meta: dict[str, Any],
                       max_cached_items: int = DEFAULT_MAX_ITEMS) -> ServingModel:
    """The model in ``directory``, or ModelArtifactError saying why it cannot serve from the store
    that ``store_meta`` (its store.json) describes; ``max_cached_items``: its item vector cache's bound."""
    directory = Path(directory)
    try:
        model, manifest = load_model(directory)
    except ModelArtifactError:
        raise
    except Exception as exc:  # a damaged artifact can fail anywhere in construction
        raise ModelArtifactError(f"{directory}: cannot be loaded ({type(exc).__name__}: {exc})") from exc
    schema = check_schema(directory, manifest, store_meta)
    config = RunConfig.from_dict(manifest["config"])
    input_features, history_length = model_inputs(config, schema.categorical_features)
    stored_history = int(store_meta["history_length"])
    if history_length > stored_history:
        raise ModelArtifactError(
            f"{directory}: reads the last {history_length} behaviours (data.max_history) but the store keeps "
            f"{stored_history} per user (store.json history_length); train with data.max_history <= "
            f"{stored_history}, or load the store with a longer history")
    unknown = sorted(set(f["name"] for f in manifest["features"]) - set(schema.categorical_features))
    if unknown:
        raise ModelArtifactError(f"{directory}: reads features {unknown} that schema {schema.name} does not "
                                 f"declare (it has {schema.categorical_features})")
    dense = DERIVED_DENSE + list(schema.numeric)
    if not set(manifest["dense_features"]) <= set(dense):
        raise ModelArtifactError(f"{directory}: dense features {manifest['dense_features']} are not among {dense}, "
                                 f"which serving computes for schema {schema.name}")
    inference = inference_ranker(model, schema, manifest["dense_features"])
    serving = ServingModel(model, manifest, directory, schema, input_features, history_length,
                           shares_histories=config.sequence.mode in ("dare", "coupled"), inference=inference,
                           inputs=InputBuilder(schema, inference, history_length, max_cached_items,
                                               manifest["model_version"]))
    cold_start = [(UserFeatures(user_id=0), [ItemFeatures(item_id=0)])]
    cold = serving.probabilities(serving.batch(cold_start, {}))
    if not np.isfinite(cold).all():
        raise ModelArtifactError(f"{directory}: scores a cold-start request as {cold.tolist()}; weights damaged?")
    eager = serving.eager_probabilities(serving.eager_batch(cold_start, {}))
    if not np.allclose(cold, eager, rtol=0, atol=1e-5):
        raise ModelArtifactError(f"{directory}: the inference path scores a cold-start request {cold.tolist()}, "
                                 f"the exported model {eager.tolist()}; please report this as a bug")
    return serving


def check_schema(directory: Path, manifest: dict[str, Any], store_meta: dict[str, Any]) -> DatasetSchema:
    """The schema a model was trained on, if it is the one the store holds (else ModelArtifactError)."""
    if not manifest.get("schema"):
        raise ModelArtifactError(f"{directory}: its manifest records no data set schema (exported by an older "
                                 "plexrec); export it again (train it again) with this version")
    try:
        trained_on = DatasetSchema.from_dict(manifest["schema"], where=f"{directory} manifest schema")
    except ValueError as exc:  # ConfigError: a schema this code cannot read
        raise ModelArtifactError(f"{directory}: {exc}") from None
    stored = DatasetSchema.from_dict(store_meta["schema"], where="store.json schema")
    # fingerprints recomputed on both sides: what counts is the contract, not a digest written earlier
    if trained_on.fingerprint() != stored.fingerprint():
        raise ModelArtifactError(f"{directory}: trained on schema {trained_on.name}, the store holds "
                                 f"{stored.name}: {'; '.join(trained_on.differences(stored))}")
    return stored


def _file_signature(directory: Path) -> tuple:
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in directory.iterdir() if f.is_file()))


class ModelWatcher:
    """Holds the serving model and moves to a newer exported version when one appears.

    ``path`` is a model root (versions as sub-directories, newest served) or one
    version directory (served as is, never reloaded). The current model is one
    attribute, so a request reads either the old or the new model, never a mix.
    """

    def __init__(self, path: str | Path, store_meta: dict[str, Any], max_cached_items: int = DEFAULT_MAX_ITEMS) -> None:
        """``max_cached_items``: each model's item vector cache holds at most this many items."""
        self.path, self.store_meta, self.max_cached_items = Path(path), store_meta, max_cached_items
        if not self.path.is_dir():
            raise ModelArtifactError(f"{self.path}: no such model directory; `plexrec train` exports models to "
                                     "<out_dir>/models (e.g. runs/ml100k/models)")
        self.watching = not (self.path / MANIFEST_FILE).is_file()
        # version -> (its files' sizes and times, why): a broken artifact is not retried until its
        # files change (a version copied in non-atomically is loaded once the copy completes)
        self.refused: dict[str, tuple[tuple, str]] = {}
        self.ignored: set[str] = set()  # directories of the root that are not versions, logged once each
        self._lock = threading.Lock()
        self.current = load_serving_model(self._newest_version() if self.watching else self.path, store_meta,
                                          max_cached_items)
        log.info("serving model %s from %s", self.current.version, self.current.directory)

    def check(self) -> bool:
        """Load the newest version if it is new; True when the served model changed."""
        if not self.watching:
            return False
        with self._lock:  # one reload at a time
            try:
                newest = self._newest_version()
            except (ModelArtifactError, OSError) as exc:
                log.warning("model root %s unreadable, still serving %s: %s", self.path, self.current.version, exc)
                return False
            if newest.name == self.current.directory.name:
                return False
            files = _file_signature(newest)
            if newest.name in self.refused and self.refused[newest.name][0] == files:
                return False
            try:
                candidate = load_serving_model(newest, self.store_meta, self.max_cached_items)
            except ModelArtifactError as exc:
                self.refused[newest.name] = (files, str(exc))
                log.error("refused model %s, still serving %s: %s", newest.name, self.current.version, exc)
                return False
            previous, self.current = self.current, candidate
            log.info("model %s replaced %s", candidate.version, previous.version)
            return True

    def _newest_version(self) -> Path:
        """The newest version directory of the root. Other directories (``backup``, ``tmp``) are
        skipped with one log line when first seen: by name they would sort after every version."""
        versions, others = version_directories(self.path)
        unseen = sorted(set(others) - self.ignored)
        if unseen:
            log.warning("model root %s: ignoring %s: not model versions (exported versions are named like "
                        "20240131T120000-0123abcd)", self.path, ", ".join(unseen))
            self.ignored.update(unseen)
        if not versions:
            found = f" (it holds only {', '.join(others)})" if others else ""
            raise ModelArtifactError(f"{self.path}: holds no exported model version{found}; run `plexrec train` "
                                     "first")
        return versions[-1]
