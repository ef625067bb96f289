import torch
import torch.nn.functional as F

from recsys.config import FeatureConfig
from recsys.embeddings import UnifiedEmbedding
from recsys.model import Ranker
from tests.test_embeddings import RAW, kjt


def reference_forward(model: Ranker, dense: torch.Tensor, sparse) -> torch.Tensor:
    """The ranker written out with explicit matrix products."""
    x0 = torch.cat([model.embedding(sparse), dense], dim=1)
    x = x0
    for layer in getattr(model.cross, "layers", []):
        x = x0 * (x @ layer.weight.T + layer.bias) + x
    for layer in model.tower:
        x = F.relu(x @ layer.weight.T + layer.bias) if isinstance(layer, torch.nn.Linear) else x
    return (x @ model.head.weight.T + model.head.bias)[:, 0]


def test_ranker_with_cross_layers_matches_reference():
    torch.manual_seed(0)
    emb = UnifiedEmbedding([FeatureConfig("user_id", 2), FeatureConfig("item_id", 1), FeatureConfig("genres", 1)],
                           num_rows=50, dim=4)
    model = Ranker(emb, num_dense=3, hidden=[16, 8], cross_layers=2)
    dense = torch.randn(4, 3)
    sparse = kjt(RAW)
    torch.testing.assert_close(model(dense, sparse), reference_forward(model, dense, sparse))
    assert len(model.cross.layers) == 2 and model(dense, sparse).shape == (4,)


def test_ranker_without_cross_layers_is_a_plain_mlp():
    emb = UnifiedEmbedding([FeatureConfig("user_id", 1)], num_rows=10, dim=2)
    model = Ranker(emb, num_dense=1, hidden=[4], cross_layers=0)
    assert isinstance(model.cross, torch.nn.Identity)
    dense, sparse = torch.randn(2, 1), kjt({"user_id": [[1], [2]]})
    torch.testing.assert_close(model(dense, sparse), reference_forward(model, dense, sparse))
