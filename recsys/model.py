"""The ranker, top to bottom: embeddings + dense features [+ history] -> [DCN-v2 cross] -> MLP -> logit.

    search = sequence.search(sparse)                 (dare / coupled: top-k behaviours)
    e      = embedding(sparse, extra history ids)    (one lookup of the unified table)
    x0     = [e[features], dense, sequence(R(t), e[history], search)]
    x_l+1  = x0 * (W_l x_l + b_l) + x_l            (DCN-v2 cross layers, optional)
    logit  = MLP(x_L)

The embedding layer is any of recsys.embeddings (unified, hashed, full
vocabulary); the tower is the same for all three, so they compare at equal
tower size. ``build_ranker`` makes a model from a run config and the training
vocabularies, and is the one place training, export and serving build it.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import RunConfig
from recsys.embeddings import build_embedding
from recsys.sequence import REPRESENTATION_FEATURES, SequenceEncoder, SharedHistories


class CrossNetV2(nn.Module):
    """DCN-v2 cross layers (Wang et al., 2021), full-rank."""

    def __init__(self, width: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


def mlp(widths: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Ranker(nn.Module):
    def __init__(self, embedding: nn.Module, num_dense: int, hidden: list[int], cross_layers: int = 0,
                 dropout: float = 0.0, sequence: SequenceEncoder | None = None) -> None:
        super().__init__()
        self.embedding = embedding
        self.sequence = sequence
        width = embedding.output_dim + num_dense
        if sequence is not None:
            width += sequence.output_dim
            # the target's representation R(t): its representation features' columns, in order
            starts = dict(zip(embedding.features, torch.tensor([0, *embedding.feature_probes]).cumsum(0).tolist()))
            columns = [torch.arange(starts[f] * embedding.dim, (starts[f] + probes) * embedding.dim)
                       for f, probes in sequence.representation]
            self.register_buffer("target_columns", torch.cat(columns), persistent=False)
        self.cross = CrossNetV2(width, cross_layers) if cross_layers > 0 else nn.Identity()
        self.tower = mlp([width, *hidden], dropout)
        self.head = nn.Linear(hidden[-1] if hidden else width, 1)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor,
                shared_histories: SharedHistories | None = None) -> torch.Tensor:
        """Logits [B] for dense features [B, num_dense] and a KJT of raw categorical ids; a sequence
        model reads the history keys of the KJT, or ``shared_histories`` (rows sharing a history)."""
        if self.sequence is None:
            x = torch.cat([self.embedding(sparse), dense], dim=1)
        else:
            search = self.sequence.search(sparse, shared_histories)
            embedded = self.embedding(sparse, self.sequence.unified_ids(sparse, search, shared_histories))
            features = embedded[:, :self.embedding.output_dim]
            target = features[:, self.target_columns]
            history = self.sequence(target, embedded[:, self.embedding.output_dim:], search)
            x = torch.cat([features, dense, history], dim=1)
        return self.head(self.tower(self.cross(x))).squeeze(-1)


def build_ranker(config: RunConfig, vocabularies: dict[str, torch.Tensor], num_dense: int,
                 embedding_device: torch.device | str | None = None) -> Ranker:
    """The model of a run config on CPU; ``embedding_device="meta"`` leaves the tables
    unallocated for DistributedModelParallel to create sharded."""
    emb = config.embedding
    sequence = None
    if config.sequence.mode != "none":
        by_name = {f.name: f for f in config.features}
        representation = [by_name[name] for name in REPRESENTATION_FEATURES if name in by_name]
        sequence = SequenceEncoder(config.sequence, representation, emb.dim, embedding_device)
    embedding = build_embedding(emb.kind, config.features, emb.dim, emb.num_rows, vocabularies, embedding_device,
                                sequence.extra_lookups() if sequence else [])
    return Ranker(embedding, num_dense, config.model.mlp, config.model.cross_layers, config.model.dropout,
                  sequence)
