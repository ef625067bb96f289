"""The examples a run config's ``data`` section describes: read from the files (the direct loader)
or built from the feature store (``data.source: feast``)."""

from __future__ import annotations

from features.example_sql import EngineSettings
from features.examples import Examples, SplitRule, build_examples
from features.schema import DataError, DatasetSchema
from features.store import stored_schema
from features.datasets import read_tables
from features.training import examples_from_store
from recsys.config import resolve_path


def load_schema(data_config) -> DatasetSchema:
    return DatasetSchema.from_yaml(resolve_path(data_config.schema))


def check_store_schema(data_config, schema: DatasetSchema) -> None:
    """Stop, naming the differences, when the store was loaded with another schema than the config's."""
    differences = load_schema(data_config).differences(schema)
    if differences:
        raise DataError(f"data.schema {data_config.schema} is not the schema the store in "
                        f"{data_config.store_dir or 'the default data directory'} was loaded with "
                        f"({schema.name}): {'; '.join(differences[:5])}; set data.schema to that data set's "
                        "schema (or load the store again)")


def load_dataset(data_config) -> tuple[Examples, DatasetSchema]:
    """The examples a run config's ``data`` section describes."""
    split = SplitRule.of(data_config)
    if data_config.source == "feast":  # the feature store's point-in-time view of the same data
        schema = stored_schema(data_config.store_dir)
        check_store_schema(data_config, schema)
        settings = EngineSettings(memory_limit=data_config.engine_memory)
        return examples_from_store(None, data_config.store_dir, split=split, settings=settings,
                                   engine=data_config.example_engine), schema
    schema = load_schema(data_config)
    tables = read_tables(schema, data_config.synthetic)
    return build_examples(tables.joined(), schema, split), schema
