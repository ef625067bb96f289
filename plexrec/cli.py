"""The ``plexrec`` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys

from recsys.logs import configure_logging


# jobs with their own parsers, dispatched before anything imports torch (ingest, replay and score never do)
STANDALONE_COMMANDS = {"ingest": "features.ingest:main", "replay": "features.events:replay_main",
                       "serve": "serving.server:main", "score": "serving.client:main",
                       "quickstart": "plexrec.quickstart:main", "learn": "recsys.learn:main"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in STANDALONE_COMMANDS:
        import importlib

        module, function = STANDALONE_COMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    parser = argparse.ArgumentParser(
        prog="plexrec",
        description="CTR ranking with multiplexed unified embeddings (TorchRec) and DARE long-sequence attention.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("ingest", help="consume user events from Kafka into the feature store (see --help)")
    commands.add_parser("replay", help="publish a data set's interactions to Kafka as events (see --help)")
    commands.add_parser("quickstart", help="the whole loop on one machine: broker, store, training, "
                                           "ingester, server, events, scores (see --help)")
    commands.add_parser("serve", help="the gRPC scoring server over an exported model (see --help)")
    commands.add_parser("learn", help="keep training the served model on streamed events, exporting new "
                                      "versions (see --help)")
    commands.add_parser("score", help="score items for a user on a running server (see --help)")

    train = commands.add_parser("train", help="train a ranker, evaluate it, export a versioned model",
                                description="Train on one process (gloo on CPU). For many processes use "
                                            "`torchrun --nproc-per-node N -m recsys.train_command` with the same flags.")
    if argv and argv[0] == "train":  # its flags live with the trainer, which imports torch: only when training
        from recsys.train_command import add_train_arguments  # deferred: imports torch

        add_train_arguments(train)

    features = commands.add_parser("features", help="the Feast feature store: load a data set, ...")
    feature_commands = features.add_subparsers(dest="features_command", metavar="ACTION", required=True)
    load = feature_commands.add_parser(
        "load", help="write a data set into the offline store, apply the definitions, materialise online")
    load.add_argument("--schema", help="the data set's schema file (default: the config's data.schema, "
                                       "MovieLens 100K)")
    load.add_argument("-c", "--config", help="run config whose `data` section names the schema and history "
                                             "length (default: the embedded ml100k config)")
    load.add_argument("--history-length", type=int, help="behaviours kept per user (default: data.max_history)")
    load.add_argument("--data-dir", help="the store's data directory (default: $PLEXREC_DATA_DIR or .plexrec)")
    load.add_argument("--profile", default="local", choices=["local", "redis"], help="store profile")
    load.add_argument("--redis-url", help="host:port of Redis for --profile redis")

    publish = feature_commands.add_parser(
        "publish", help="write a trained model's item embeddings to the online and offline store")
    publish.add_argument("--model-dir", required=True,
                         help="an exported model directory, or a models/ folder (its newest version)")
    publish.add_argument("--data-dir", help="the store's data directory (default: $PLEXREC_DATA_DIR or .plexrec)")
    publish.add_argument("--profile", default="local", choices=["local", "redis"], help="store profile")
    publish.add_argument("--redis-url", help="host:port of Redis for --profile redis")

    compact = feature_commands.add_parser(
        "compact", help="append the ingester's new logged events to the event log and the training rows "
                        "(training from the store does this first)")
    compact.add_argument("--data-dir", help="the store's data directory (default: $PLEXREC_DATA_DIR or .plexrec)")

    examples = feature_commands.add_parser(
        "examples", help="write every label event's point-in-time training example as Parquet shards by user")
    examples.add_argument("--out", required=True, help="the folder to write (replaced)")
    size = examples.add_mutually_exclusive_group()
    size.add_argument("--shards", type=int, help="user shards (default: as many as hold --shard-examples each)")
    size.add_argument("--shard-examples", type=int, default=200_000,
                      help="about this many examples per shard (default 200000, training's data.shard_examples)")
    examples.add_argument("--engine", default="duckdb", choices=["duckdb", "spark"],
                          help="query engine (spark: local[*], or $PLEXREC_SPARK_MASTER)")
    examples.add_argument("--memory", default="2GB", help="the engine's memory before it spills (default 2GB)")
    examples.add_argument("--data-dir", help="the store's data directory (default: $PLEXREC_DATA_DIR or .plexrec)")

    show = feature_commands.add_parser(
        "show", help="what the online store holds for one user or item, as JSON (for debugging a pipeline)")
    which = show.add_mutually_exclusive_group(required=True)
    which.add_argument("--user", type=int, metavar="ID", help="a user's profile, history and ingester state")
    which.add_argument("--item", type=int, metavar="ID",
                       help="an item's profile, counters, ingester state and published embeddings")
    show.add_argument("--data-dir", help="the store's data directory (default: $PLEXREC_DATA_DIR or .plexrec)")
    show.add_argument("--profile", default="local", choices=["local", "redis"], help="store profile")
    show.add_argument("--redis-url", help="host:port of Redis for --profile redis")

    broker = commands.add_parser("broker", help="run the embedded Kafka-compatible broker (tansu) until Ctrl-C")
    broker.add_argument("--port", type=int, default=9092, help="loopback port to listen on (default 9092)")

    args = parser.parse_args(argv)
    configure_logging(getattr(args, "verbose", False))
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    if args.command == "train":
        # deferred: recsys.train_command and recsys.checkpoints import torch, which only training loads
        from features.errors import ConfigError
        from features.schema import DataError
        from recsys.checkpoints import CheckpointMismatchError
        from recsys.train_command import run_training

        try:
            run_training(args)
        except (ConfigError, DataError, CheckpointMismatchError) as exc:
            sys.exit(f"plexrec train: {exc}")
    elif args.command == "broker":
        from features.broker import BrokerError, run_forever  # deferred: lazy dispatch, as below

        try:
            run_forever(args.port)
        except BrokerError as exc:
            sys.exit(f"plexrec broker: {exc}")
    elif args.command == "features" and args.features_command == "load":
        load_features(args)
    elif args.command == "features" and args.features_command == "publish":
        publish_features(args)
    elif args.command == "features" and args.features_command == "show":
        show_features(args)
    elif args.command == "features" and args.features_command == "compact":
        compact_features(args)
    elif args.command == "features" and args.features_command == "examples":
        write_examples(args)


def write_examples(args: argparse.Namespace) -> None:
    """`plexrec features examples`: the store's point-in-time examples as Parquet shards."""
    from pathlib import Path

    # deferred: lazy dispatch, a command loads only its own modules (these are torch-free)
    from features.event_log import compact_event_log
    from features.example_sql import EngineSettings
    from features.example_tables import build_example_tables
    from features.store import StoreError, data_dir, stored_schema
    from features.schema import DataError

    log = logging.getLogger("plexrec.features")
    try:
        directory = data_dir(args.data_dir)
        schema = stored_schema(directory)
        log.info("event log: %s", compact_event_log(directory).summary())
        tables = build_example_tables(directory / "offline", schema, Path(args.out), shards=args.shards or 1,
                                      shard_examples=None if args.shards else args.shard_examples,
                                      settings=EngineSettings(memory_limit=args.memory), engine=args.engine)
    except (StoreError, DataError) as exc:
        sys.exit(f"plexrec features examples: {exc}")
    log.info("wrote %s: %s", args.out, tables.summary())


def compact_features(args: argparse.Namespace) -> None:
    """`plexrec features compact`: the event log compacted, the offline views extended with it."""
    # deferred: lazy dispatch, a command loads only its own modules (these are torch-free)
    from features.event_log import main as compact
    from features.store import StoreError
    from features.schema import DataError

    try:
        compact(args.data_dir)
    except (StoreError, DataError) as exc:
        sys.exit(f"plexrec features compact: {exc}")


def show_features(args: argparse.Namespace) -> None:
    """`plexrec features show`: one entity's online state, as JSON on stdout."""
    import json

    # deferred: lazy dispatch, a command loads only its own modules (these are torch-free)
    from features.show import entity_state
    from features.store import StoreError, data_dir, open_store, read_store_meta

    try:
        directory = data_dir(args.data_dir)
        meta = read_store_meta(directory)
        kind, entity_id = ("user", args.user) if args.user is not None else ("item", args.item)
        state = entity_state(open_store(args.profile, directory, args.redis_url), meta, kind, entity_id)
    except StoreError as exc:
        sys.exit(f"plexrec features show: {exc}")
    print(json.dumps(state, indent=2))


def publish_features(args: argparse.Namespace) -> None:
    """`plexrec features publish`: every known item's embeddings, tagged with the model version."""
    # deferred: recsys.export and recsys.item_embeddings import torch, which no other command may load
    from features.store import StoreError, data_dir, open_store
    from recsys.export import ModelArtifactError
    from recsys.item_embeddings import publish_model_embeddings

    try:
        directory = data_dir(args.data_dir)
        publish_model_embeddings(args.model_dir, open_store(args.profile, directory, args.redis_url), directory)
    except (ModelArtifactError, StoreError) as exc:
        sys.exit(f"plexrec features publish: {exc}")


def load_features(args: argparse.Namespace) -> None:
    """`plexrec features load`: a data set into the store, offline and online."""
    import time

    # deferred: lazy dispatch, a command loads only its own modules (these are torch-free)
    from features.load import load_into_store
    from features.store import StoreError, data_dir, open_store
    from features.errors import ConfigError
    from recsys.config import load_config, resolve_path
    from features.schema import DataError, DatasetSchema
    from features.datasets import read_tables

    log = logging.getLogger("plexrec.features")
    try:
        config = load_config(args.config)
        schema = DatasetSchema.from_yaml(resolve_path(args.schema or config.data.schema))
        history_length = args.history_length or config.data.max_history
        started = time.perf_counter()
        tables = read_tables(schema, config.data.synthetic)
        directory = data_dir(args.data_dir)
        store = open_store(args.profile, directory, args.redis_url)
        counts = load_into_store(store, tables, directory, history_length=history_length)
    except (ConfigError, DataError, StoreError) as exc:
        sys.exit(f"plexrec features load: {exc}")
    log.info("loaded %s into %s (profile %s, histories of %d) in %.1f s: %s", schema.name, directory, args.profile,
             history_length, time.perf_counter() - started, ", ".join(f"{k} {v:,}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
