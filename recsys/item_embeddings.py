"""Every item's trained embeddings, read from an exported model, for publishing.

    representation R(item)  the item's embedding of each representation feature (item id,
                            and category when it is a feature), concatenated: what the
                            ranker uses as R(t) for a target and pools for a behaviour
    attention A(item)       the item's vector in DARE's attention table (id probes + category;
                            no position, which belongs to a behaviour); empty without DARE

Both come from the modules' own hash and tables, so they are the vectors the model reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from features.event_log import item_profiles
from features.examples import category_id
from features.publish import PublishedEmbeddings, publish_item_embeddings
from features.store import StoreError
from recsys.export import MANIFEST_FILE, latest_model_dir, load_model
from recsys.model import Ranker
from recsys.sequence import REPRESENTATION_FEATURES, TARGET_CATEGORY, TARGET_ITEM


@torch.no_grad()
def item_embeddings(model: Ranker, item_ids: np.ndarray,
                    category_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(representation [n, d_r], attention [n, d_a] or [n, 0]) for raw item and category ids."""
    items = torch.as_tensor(item_ids, dtype=torch.int64)
    categories = None if category_ids is None else torch.as_tensor(category_ids, dtype=torch.int64)
    values = {TARGET_ITEM: items, TARGET_CATEGORY: categories}
    representation = torch.cat([model.embedding.embed_values(name, values[name])
                                for name in REPRESENTATION_FEATURES
                                if name in model.embedding.features and values[name] is not None], dim=1)
    if model.sequence is not None and model.sequence.mode == "dare":
        attention = model.sequence.space.item_vectors(items, categories)
    else:
        attention = torch.zeros(len(items), 0)
    return representation.numpy(), attention.numpy()


def catalogue_embeddings(model: Ranker, directory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item ids, representation, attention) of every item of the store in ``directory`` (its offline
    item profile as it stands: the loaded catalogue with the item attributes the stream carried since,
    each item's newest category; features/event_log.py ``item_profiles``), from ``model``."""
    items_path = Path(directory) / "offline" / "item_profile.parquet"
    if not items_path.exists():
        raise StoreError(f"{items_path} is missing: run `plexrec features load` first")
    items = item_profiles(directory, ["item_category"])
    ids = items["item_id"].to_numpy(np.int64)
    representation, attention = item_embeddings(model, ids, items["item_category"].map(category_id).to_numpy())
    return ids, representation, attention


def publish_model_embeddings(model_dir, store, directory, state: PublishedEmbeddings | None = None
                             ) -> tuple[int, str]:
    """Every catalogue item's embeddings of an exported model (a version directory, or a models/
    root: its newest) into the store's online and offline item_embeddings, where they differ from
    the published ones (features/publish.py compares; with shared (hashed) rows any item may change,
    so all are compared); (rows written, model version). ``state``: the published vectors as a
    long-lived publisher (the learner) keeps them between calls."""
    model_dir = Path(model_dir)
    if not (model_dir / MANIFEST_FILE).exists():
        model_dir = latest_model_dir(model_dir)
    model, manifest = load_model(model_dir)
    ids, representation, attention = catalogue_embeddings(model, directory)
    rows = publish_item_embeddings(store, ids, representation, attention, manifest["model_version"], directory,
                                   state=state)
    return rows, manifest["model_version"]
