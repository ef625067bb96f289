"""Every item's trained embeddings, read from an exported model, for publishing.

    representation R(item)  the item's embedding of each representation feature (item id,
                            and category when it is a feature), concatenated: what the
                            ranker uses as R(t) for a target and pools for a behaviour
    attention A(item)       the item's vector in DARE's attention table (id probes + category;
                            no position, which belongs to a behaviour); empty without DARE

Both come from the modules' own hash and tables, so they are the vectors the model reads.
"""

from __future__ import annotations

import numpy as np
import torch

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
