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

from features.errors import ConfigError
from features.schema import DatasetSchema

PROJECT_ROOT = Path(__file__).resolve().parent.parent


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
    # the data set's schema file (features/schema.py): MovieLens 100K by default
    schema: str = "data/ml-100k/schema.yaml"
    # how examples are split: "last_n" (per user: the last n -> test, the n before -> validation)
    # or "time" (one cut for everyone: the latest test_fraction of rows -> test, the valid_fraction
    # before -> validation; valid_from / test_from, in the schema's timestamp unit, set the cuts
    # instead). A schema's own split column, where it declares one, is used as it is.
    split: str = "last_n"
    eval_last_n: int = 5
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    valid_from: int | None = None
    test_from: int | None = None
    max_history: int = 200  # most recent previous items kept per example
    # dense features the tower reads: None = the two derived counters (log prior counts of the
    # user and the item) and every numeric column of the schema; a list = exactly those; [] = none
    dense: list[str] | None = None
    synthetic: dict = field(default_factory=dict)  # generator overrides for a synthetic schema
    # "direct": read the files; "feast": point-in-time examples from the feature store in
    # store_dir (after `plexrec features load`), the same examples
    source: str = "direct"
    store_dir: str | None = None
    # how "feast" builds them (features/example_tables.py): "duckdb" in this process, or "spark"
    # (local[*], or the cluster at $PLEXREC_SPARK_MASTER); the engine's memory before it spills
    example_engine: str = "duckdb"
    engine_memory: str = "2GB"
    # training from the store streams its examples from user shards of about this many examples
    # (0: all in memory), buffer_shards of them open at once (recsys/data/example_stream.py):
    # memory is set by these two, not by the data
    shard_examples: int = 200_000
    buffer_shards: int = 4


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
    # tau, the factor of the (scaled dot product) scores in the softmax over the kept behaviours
    # (dare and coupled; the top-k does not change with it): its initial value, and whether it is
    # learned (as exp of a dense parameter). recsys/sequence.py says why.
    logit_scale: float = 1.0
    learn_logit_scale: bool = False


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 256  # global batch; each rank takes batch_size / world_size
    dense_lr: float = 1e-3
    embedding_lr: float = 0.05
    # the row-wise Adagrad rate of the sequence's attention table (dare) or coupled table; None:
    # embedding_lr. That table learns only through the softmax over the kept behaviours, whose
    # gradients are small while the scores are flat (bench/dare_diagnostics.py)
    attention_lr: float | None = None
    weight_decay: float = 0.0
    seed: int = 0
    out_dir: str = "runs/ml100k"
    checkpoint_every_epoch: bool = True
    # the model kept (exported, reported) is the epoch with the best validation `early_stopping_metric`;
    # training stops after `early_stopping_patience` epochs without a better one (0: never stops early)
    early_stopping_patience: int = 0
    early_stopping_metric: str = "auc"  # a validation metric: auc, gauc (higher is better) or logloss


ID_PROBES = 2  # ids carry the most information per value: by default they read two rows


def default_features(available: list[str]) -> list[FeatureConfig]:
    """Every categorical feature a data set offers (its category aside: sequence models read it
    anyway), ids with two probes, the rest with one: what an empty ``features`` list means."""
    return [FeatureConfig(name, ID_PROBES if name in ("user_id", "item_id") else 1)
            for name in available if name != "item_category"]


EMBEDDING_KINDS = ("unified", "hashed", "full")
STOPPING_METRICS = {"auc": 1, "gauc": 1, "logloss": -1}  # +1: higher is better


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    # empty: every feature of the schema (default_features); a run that needs them resolves it
    features: list[FeatureConfig] = field(default_factory=list)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        names = [f.name for f in self.features]
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
        if self.train.early_stopping_patience < 0:
            raise ConfigError(f"train.early_stopping_patience = {self.train.early_stopping_patience}: use 0 (off) "
                              "or more epochs")
        if self.train.early_stopping_metric not in STOPPING_METRICS:
            raise ConfigError(f"train.early_stopping_metric = {self.train.early_stopping_metric!r}: choose one of "
                              f"{', '.join(STOPPING_METRICS)}")
        _positive("data.eval_last_n", self.data.eval_last_n)
        if self.data.max_history < 0:
            raise ConfigError(f"data.max_history = {self.data.max_history}: use 0 or more")
        if self.data.split not in ("last_n", "time"):
            raise ConfigError(f"data.split = {self.data.split!r}: choose last_n (per user) or time (one cut)")
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self.data, name)
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"data.{name} = {value!r}: a share of the rows, between 0 and 1")
        if self.data.valid_fraction + self.data.test_fraction >= 1:
            raise ConfigError("data.valid_fraction + data.test_fraction leave no training rows; lower them")
        seq = self.sequence
        if self.train.attention_lr is not None and (seq.mode not in ("dare", "coupled")
                                                    or not self.train.attention_lr > 0):
            raise ConfigError(f"train.attention_lr = {self.train.attention_lr!r}: a rate > 0 for the attention "
                              "table of sequence.mode dare or coupled (leave it unset otherwise)")
        if seq.mode not in SEQUENCE_MODES:
            raise ConfigError(f"sequence.mode = {seq.mode!r}: choose one of {', '.join(SEQUENCE_MODES)}")
        if seq.mode != "none":
            _positive("sequence.top_k", seq.top_k)
            _positive("sequence.attention_dim", seq.attention_dim)
            _positive("sequence.attention_rows", seq.attention_rows)
            _positive("sequence.attention_probes", seq.attention_probes)
            _positive("sequence.position_buckets", seq.position_buckets)
            if not isinstance(seq.logit_scale, (int, float)) or not 0 < seq.logit_scale < float("inf"):
                raise ConfigError(f"sequence.logit_scale = {seq.logit_scale!r}: the softmax's initial logit scale, "
                                  "a number > 0")
            if not isinstance(seq.learn_logit_scale, bool):
                raise ConfigError(f"sequence.learn_logit_scale = {seq.learn_logit_scale!r}: true or false")
            if self.data.max_history < 1:
                raise ConfigError(f"sequence.mode = {seq.mode!r} reads histories, but data.max_history = "
                                  f"{self.data.max_history}; set it to 1 or more")
            if names and "item_id" not in names:
                raise ConfigError("sequence models need the feature 'item_id' (the target item) in features")
            if seq.mode in ("mean", "dare") and self.embedding.kind != "unified":
                raise ConfigError(f"sequence.mode = {seq.mode!r} looks history items up in the unified table: "
                                  "set embedding.kind = unified")
        if self.data.source not in ("direct", "feast"):
            raise ConfigError(f"data.source = {self.data.source!r}: choose direct or feast")
        if self.data.shard_examples < 0 or self.data.buffer_shards < 1:
            raise ConfigError("data.shard_examples must be >= 0 (0: in memory) and data.buffer_shards >= 1")
        if self.data.example_engine not in ("duckdb", "spark"):
            raise ConfigError(f"data.example_engine = {self.data.example_engine!r}: choose duckdb or spark")
        if not self.data.schema:
            raise ConfigError("data.schema: name the data set's schema file (e.g. data/ml-100k/schema.yaml)")
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
        feature_list = [_feature_from_raw(item) for item in raw.get("features") or []]
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


REPLACED_KEYS = {
    "data.dataset": "data.schema names the data set now (data/ml-100k/schema.yaml, data/kuairand-pure/schema.yaml, "
                    "data/synthetic/schema.yaml, or your own)",
    "data.path": "the schema file says where the data is (its 'path')",
    "data.label_threshold": "the schema holds the label rule ('rating_threshold')",
}


def _section(cls: type, raw: Any, name: str) -> Any:
    raw = dict(raw or {})
    for key in raw:
        if f"{name}.{key}" in REPLACED_KEYS:
            raise ConfigError(f"{name}.{key} is gone: {REPLACED_KEYS[f'{name}.{key}']}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {sorted(unknown)}; known keys: {sorted(fields)}")
    for key, value in raw.items():
        _check_type(f"{name}.{key}", value, str(fields[key].type))
    return cls(**raw)


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "None": (type(None),)}


def _check_type(key: str, value: Any, annotation: str) -> None:
    """A value of the annotated kind (``int``, ``str | None``, ``list[int]``, ...), or ConfigError naming the key."""
    allowed: list[type] = []
    for part in (p.strip() for p in annotation.split("|")):
        allowed += _TYPES.get(part, (list,) if part.startswith("list") else (dict,) if part.startswith("dict") else ())
    if not allowed:
        return
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{key} = {value!r}: expected {annotation}")
    if not isinstance(value, tuple(allowed)):
        raise ConfigError(f"{key} = {value!r}: expected {annotation}")


SECTIONS = ("data", "features", "embedding", "model", "sequence", "train")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a run config from YAML (``None``: the embedded defaults, MovieLens 100K).

    ``overrides`` maps dotted keys to values, e.g. ``{"train.epochs": 2}``,
    ``{"features.user_id.probes": 3}``, ``{"features": ["user_id", "item_id"]}`` or
    ``{"data.synthetic.num_users": 500}``; a key that names nothing fails naming it. An empty
    ``features`` list becomes every feature the schema declares (``default_features``).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    probes: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"{dotted}: unknown section {section!r}; sections: {', '.join(SECTIONS)}")
        if section == "features":
            name, _, attribute = key.rpartition(".")
            if not key:
                raw["features"] = value
            elif attribute == "probes" and name:
                probes[name] = value
            else:
                raise ConfigError(f"{dotted}: set a feature's probes with features.<name>.probes=<n>, or the "
                                  "whole list with features=[...]")
            continue
        if not key:
            raise ConfigError(f"{dotted}: use section.key=value, e.g. train.epochs=3")
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        head, _, rest = key.partition(".")
        if rest:  # into a mapping field, e.g. data.synthetic.num_users
            inner = target.setdefault(head, {})
            if not isinstance(inner, dict) or not _is_mapping_field(section, head):
                raise ConfigError(f"{dotted}: {section}.{head} is not a mapping; set it as {section}.{head}=<value>")
            inner[rest] = value
        else:
            target[key] = value
    config = RunConfig.from_dict(raw)
    if not config.features:
        config.features = _schema_features(config.data.schema)
    names = [f.name for f in config.features]
    for name, value in probes.items():
        if name not in names:
            raise ConfigError(f"features.{name}.probes: no feature {name!r} in the features list "
                              f"({', '.join(names)})")
        config.features[names.index(name)].probes = value
    return config.validate()


def _is_mapping_field(section: str, key: str) -> bool:
    cls = {"data": DataConfig, "embedding": EmbeddingConfig, "model": ModelConfig, "sequence": SequenceConfig,
           "train": TrainConfig}[section]
    return any(f.name == key and str(f.type).startswith("dict") for f in dataclasses.fields(cls))


def _schema_features(schema_path: str | None) -> list[FeatureConfig]:
    """Every feature the schema declares (an empty ``features`` list); [] when it cannot be read
    here (the run that loads the data resolves it then, from the examples)."""
    if not schema_path or not resolve_path(schema_path).is_file():
        return []
    return default_features(DatasetSchema.from_yaml(resolve_path(schema_path)).categorical_features)


def resolve_path(path: str | Path) -> Path:
    """A data path from a config: absolute, relative to the working directory, or to the project."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p
