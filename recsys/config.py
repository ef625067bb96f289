"""Run configuration: small dataclasses, loaded from one YAML file.

The defaults are the MovieLens 100K setup of ``configs/ml100k.yaml``, so
``plexrec train`` with no config runs the main job on embedded defaults.
Every field is validated on load; a bad value stops with a message that names
the field and says how to fix it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and how to fix it."""


@dataclass
class FeatureConfig:
    """One categorical feature fed to the embedding layer.

    ``probes`` is k_f of unified embedding: the feature reads ``probes`` rows
    of the shared table and its embedding has ``probes * dim`` columns.
    """

    name: str
    probes: int = 1


@dataclass
class DataConfig:
    dataset: str = "ml100k"  # "ml100k", "generic" or "synthetic" (recsys/data/synthetic.py)
    path: str = "data/ml-100k"
    # the generic loader's schema file (YAML, see recsys/data/schema.py); unused for ml100k
    schema: str | None = None
    label_threshold: float = 4.0  # label = rating >= threshold, when the data has ratings
    eval_last_n: int = 5  # per user: last n -> test, the n before -> validation
    max_history: int = 200  # most recent previous items kept per example
    synthetic: dict = field(default_factory=dict)  # SyntheticConfig fields for dataset "synthetic"
    # "direct": read the files; "feast": point-in-time joins from the feature store in
    # store_dir (after `plexrec features load`), the same examples (ml100k only)
    source: str = "direct"
    store_dir: str | None = None


@dataclass
class EmbeddingConfig:
    kind: str = "unified"  # "unified" | "hashed" | "full"
    dim: int = 8  # d: columns of one probe
    # rows of the unified table; for "hashed", the total budget in rows of width `dim`
    # shared out over the per-feature tables. Ignored by "full".
    num_rows: int = 5_400


@dataclass
class ModelConfig:
    mlp: list[int] = field(default_factory=lambda: [64, 32])
    cross_layers: int = 0  # DCN-v2 cross layers before the MLP; 0 = plain MLP
    dropout: float = 0.0


SEQUENCE_MODES = ("none", "mean", "coupled", "dare")


@dataclass
class SequenceConfig:
    """How the ranker reads the user's behaviour history (``data.max_history`` items at most).

    none     no history
    mean     mean of the history items' representation embeddings (the unified table)
    coupled  one item table in both roles (TWIN/DIN style): scores <C(h), C(t)>, top-k,
             softmax, pooled C(h); the table is ``attention_rows`` x ``coupled_dim``
    dare     decoupled (Feng et al., 2025): scores from a small attention table
             <A(h), A(t)> / sqrt(attention_dim), top-k, softmax, pooled *representation*
             embeddings (the unified table's item rows) of the k picked behaviours only
    """

    mode: str = "none"
    top_k: int = 64
    attention_dim: int = 16
    attention_rows: int = 4_096  # rows of the attention (or coupled) table
    attention_probes: int = 1  # item-id probes in the attention table
    position_buckets: int = 12  # log2 buckets of "how many behaviours ago"
    coupled_dim: int = 0  # 0: the representation width, probes(item_id) * embedding.dim


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 256  # global batch; each rank takes batch_size / world_size
    dense_lr: float = 1e-3
    embedding_lr: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    out_dir: str = "runs/ml100k"
    checkpoint_every_epoch: bool = True


# The MovieLens features of configs/ml100k.yaml: ids get two probes (they carry the
# most information per value), profile features one.
DEFAULT_FEATURES = [
    FeatureConfig("user_id", 2),
    FeatureConfig("item_id", 2),
    FeatureConfig("age_bucket", 1),
    FeatureConfig("gender", 1),
    FeatureConfig("occupation", 1),
    FeatureConfig("zip_prefix", 1),
    FeatureConfig("genres", 1),
    FeatureConfig("release_year", 1),
]

EMBEDDING_KINDS = ("unified", "hashed", "full")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    features: list[FeatureConfig] = field(default_factory=lambda: list(DEFAULT_FEATURES))
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        names = [f.name for f in self.features]
        if not names:
            raise ConfigError("features: the list is empty; name at least one categorical feature")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ConfigError(f"features: {duplicated} listed more than once; list each feature once")
        for f in self.features:
            if not isinstance(f.probes, int) or f.probes < 1:
                raise ConfigError(
                    f"features.{f.name}.probes = {f.probes!r}: a feature needs at least 1 probe "
                    "(the number of unified-table rows it reads)"
                )
        if self.embedding.kind not in EMBEDDING_KINDS:
            raise ConfigError(
                f"embedding.kind = {self.embedding.kind!r}: choose one of {', '.join(EMBEDDING_KINDS)}"
            )
        _positive("embedding.dim", self.embedding.dim)
        _positive("embedding.num_rows", self.embedding.num_rows)
        _positive("train.batch_size", self.train.batch_size)
        _positive("train.epochs", self.train.epochs)
        _positive("data.eval_last_n", self.data.eval_last_n)
        if self.data.max_history < 0:
            raise ConfigError(f"data.max_history = {self.data.max_history}: use 0 or more")
        if self.data.dataset not in ("ml100k", "generic", "synthetic"):
            raise ConfigError(f"data.dataset = {self.data.dataset!r}: choose ml100k, generic or synthetic")
        seq = self.sequence
        if seq.mode not in SEQUENCE_MODES:
            raise ConfigError(f"sequence.mode = {seq.mode!r}: choose one of {', '.join(SEQUENCE_MODES)}")
        if seq.mode != "none":
            _positive("sequence.top_k", seq.top_k)
            _positive("sequence.attention_dim", seq.attention_dim)
            _positive("sequence.attention_rows", seq.attention_rows)
            _positive("sequence.attention_probes", seq.attention_probes)
            _positive("sequence.position_buckets", seq.position_buckets)
            if self.data.max_history < 1:
                raise ConfigError(f"sequence.mode = {seq.mode!r} reads histories, but data.max_history = "
                                  f"{self.data.max_history}; set it to 1 or more")
            if "item_id" not in names:
                raise ConfigError("sequence models need the feature 'item_id' (the target item) in features")
            if seq.mode in ("mean", "dare") and self.embedding.kind != "unified":
                raise ConfigError(f"sequence.mode = {seq.mode!r} looks history items up in the unified table: "
                                  "set embedding.kind = unified")
        if self.data.source not in ("direct", "feast"):
            raise ConfigError(f"data.source = {self.data.source!r}: choose direct or feast")
        if self.data.source == "feast" and self.data.dataset != "ml100k":
            raise ConfigError("data.source = feast: the feature definitions describe ml100k-shaped data; "
                              "set data.dataset = ml100k")
        if self.data.dataset == "generic" and not self.data.schema:
            raise ConfigError("data.schema: a generic data set needs a schema file (see README)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        raw = dict(raw or {})
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown top-level section(s) {sorted(unknown)}; "
                              "known: data, features, embedding, model, sequence, train")
        features = raw.get("features")
        if features is None:
            feature_list = list(DEFAULT_FEATURES)
        else:
            feature_list = [_feature_from_raw(item) for item in features]
        return cls(
            data=_section(DataConfig, raw.get("data"), "data"),
            features=feature_list,
            embedding=_section(EmbeddingConfig, raw.get("embedding"), "embedding"),
            model=_section(ModelConfig, raw.get("model"), "model"),
            sequence=_section(SequenceConfig, raw.get("sequence"), "sequence"),
            train=_section(TrainConfig, raw.get("train"), "train"),
        ).validate()


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} = {value!r}: must be a whole number >= 1")


def _feature_from_raw(item: Any) -> FeatureConfig:
    if isinstance(item, str):
        return FeatureConfig(item)
    if isinstance(item, dict) and "name" in item:
        unknown = set(item) - {"name", "probes"}
        if unknown:
            raise ConfigError(f"features.{item['name']}: unknown key(s) {sorted(unknown)}; "
                              "a feature has 'name' and 'probes'")
        return FeatureConfig(str(item["name"]), item.get("probes", 1))
    raise ConfigError(f"features: {item!r} is neither a name nor a mapping with 'name'")


def _section(cls: type, raw: Any, name: str) -> Any:
    raw = dict(raw or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {sorted(unknown)}; known keys: {sorted(known)}")
    return cls(**raw)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a run config from YAML (``None``: the embedded ml100k defaults).

    ``overrides`` maps dotted keys to values, e.g. ``{"train.epochs": 2}``.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})[key] = value
    return RunConfig.from_dict(raw)


def resolve_path(path: str | Path) -> Path:
    """A data path from a config: absolute, relative to the working directory, or to the project."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p
