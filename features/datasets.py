"""A data set by its schema's format: GroupLens files (MovieLens), the synthetic generator, or a
table of interactions (CSV or Parquet) with optional user and item tables.

    tables = read_tables(DatasetSchema.from_yaml("data/ml-100k/schema.yaml"))
"""

from __future__ import annotations

from features.errors import ConfigError
from features.movielens import movielens_tables
from features.schema import DatasetSchema
from features.synthetic import SyntheticConfig, generate
from features.tables import DatasetTables, read_table, tables_from_frame


def read_tables(schema: DatasetSchema, generator_overrides: dict | None = None) -> DatasetTables:
    """Every table of a data set, checked against its schema."""
    if schema.format == "grouplens":
        return movielens_tables(schema)
    if schema.format == "synthetic":
        params = {**schema.generator, **(generator_overrides or {})}
        try:
            config = SyntheticConfig(**params)
        except TypeError as exc:
            raise ConfigError(f"schema generator / data.synthetic: {exc}; see features/synthetic.py") from None
        frame, _ = generate(config)
        return tables_from_frame(frame, schema)
    paths = [schema.path] if isinstance(schema.path, str) else list(schema.path)
    interactions = read_table(paths, "interactions")
    return tables_from_frame(interactions, schema, where=f"the interactions ({', '.join(paths)})")
