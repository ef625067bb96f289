"""The whole loop on one machine: `plexrec quickstart`.

    plexrec quickstart [--schema data/ml-100k/schema.yaml] [--data-dir .plexrec] [--epochs 4] [--serve]

  1. start the embedded Kafka broker (tansu)
  2. load the first 80% (by time) of the schema's data set into a fresh local Feast store
     (profiles: the whole catalogue)
  3. train the unified-embedding + DARE ranker on the store's point-in-time examples
     (configs/ml100k_sequence.yaml for MovieLens, configs/quickstart.yaml for any other schema)
  4. publish the trained item embeddings into the store
  5. start `plexrec ingest`, `plexrec serve` and `plexrec learn` as processes of their own
  6. rank unseen items for a known user with the most new behaviours; replay the first half of
     the last 20% as events through Kafka and wait until the served model has learned them
     (the learner exports a version, the server reloads it: the freshness); score the second
     half's events with the model trained before the replay and with the served one (the AUC
     of the frozen and of the updated model on the next window); replay the second half, wait
     until the ingester has applied it, and rank again
  7. write a report (metrics table, PNG plots) into <data-dir>/quickstart/
  8. stop every process it started, also on Ctrl-C or an error (--serve: keep the
     server, the ingester and the learner running until Ctrl-C)

Everything lives in <data-dir>/quickstart/, emptied at the start.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from features.broker import embedded_broker
from features.datasets import read_tables
from features.errors import ConfigError
from features.event_log import last_offsets, read_event_log
from features.events import EventProducer, schema_events
from features.examples import build_examples, labels_of
from features.load import load_into_store
from features.online import OnlineFeatures
from features.schema import DataError, DatasetSchema, value_text
from features.store import open_store, read_store_meta
from plexrec.local_stack import start_services, wait_for
from recsys.config import PROJECT_ROOT, load_config, resolve_path
from recsys.data.batching import iterate_batches, model_inputs
from recsys.export import load_model, read_manifest
from recsys.item_embeddings import publish_model_embeddings
from recsys.learn import learned_offsets
from recsys.logs import configure_logging
from recsys.metrics import auc
from recsys.train import Trainer

log = logging.getLogger("plexrec.quickstart")

MOVIELENS_SCHEMA = PROJECT_ROOT / "data" / "ml-100k" / "schema.yaml"
MOVIELENS_CONFIG = PROJECT_ROOT / "configs" / "ml100k_sequence.yaml"
GENERIC_CONFIG = PROJECT_ROOT / "configs" / "quickstart.yaml"
TOPIC = "user-events"
TOP = 10
LEARN_EXPORT_SECONDS = 2


def split_by_time(frame: pd.DataFrame, replay_fraction: float, timestamp: str = "timestamp"
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the past: loaded and trained on, the future: replayed as events), cut at one instant;
    both in time order."""
    frame = frame.sort_values(timestamp, kind="stable")
    cut = frame[timestamp].iloc[int(len(frame) * (1 - replay_fraction))]
    return frame[frame[timestamp] < cut], frame[frame[timestamp] >= cut]


def behaviour_mask(frame: pd.DataFrame, schema) -> np.ndarray:
    """Rows that enter histories and counters under the schema's rule."""
    return np.ones(len(frame), dtype=bool) if schema.history == "all" else labels_of(frame, schema) == 1


def run_config_for(schema_path: Path, config_path: str | None, overrides: dict):
    """The run config: --config, or the shipped one for the schema, pointed at the schema."""
    if config_path is None:
        same = schema_path.resolve() == MOVIELENS_SCHEMA.resolve()
        config_path = MOVIELENS_CONFIG if same else GENERIC_CONFIG
    return load_config(config_path, {"data.schema": str(schema_path), **overrides})


def run(args: argparse.Namespace) -> dict:
    home = Path(args.data_dir or ".plexrec").resolve() / "quickstart"
    schema_path = resolve_path(args.schema)
    try:  # a wrong schema fails here, before any process starts
        schema = DatasetSchema.from_yaml(schema_path)
        # training reads the store the way a production job does: examples built in SQL, written as
        # user shards, streamed through a shuffle buffer (recsys/train.py training_examples)
        config = run_config_for(schema_path, args.config, {
            "train.out_dir": str(home / "run"), "data.source": "feast", "data.store_dir": str(home / "store"),
            **({"train.epochs": args.epochs} if args.epochs else {})})
        tables = read_tables(schema, config.data.synthetic)
    except (ConfigError, DataError) as exc:
        raise RuntimeError(str(exc)) from None
    if home.exists():
        shutil.rmtree(home)
    (home / "logs").mkdir(parents=True)
    report: dict = {"data_dir": str(home), "dataset": schema.name, "schema": str(schema_path)}
    started = time.monotonic()

    frame = tables.interactions
    if args.users:
        users = np.sort(frame[schema.user].unique())[:args.users]
        frame = frame[frame[schema.user].isin(users)]
    past, future = split_by_time(frame, args.replay_fraction, schema.timestamp)
    log.info("%s: %d interactions before the cut (store + training), %d after it (replayed as events)",
             schema.name, len(past), len(future))
    history_length = max(config.data.max_history, 1)

    with ExitStack() as stack:
        bootstrap = stack.enter_context(embedded_broker())
        store_dir = home / "store"
        store_dir.mkdir()
        store = open_store("local", store_dir)
        # profiles of every user and item (the catalogue), interactions of the past only
        counts = load_into_store(store, tables.with_interactions(past), store_dir, history_length=history_length)
        log.info("feature store at %s: %s", store_dir, ", ".join(f"{k} {v:,}" for k, v in counts.items()))

        trainer = Trainer(config)
        result = trainer.fit(progress=not args.no_progress)
        report["training"] = {"test": result["test"], "epochs": result["epochs"],
                              "embedding_parameters": result["embedding_parameters"],
                              "model_dir": result["model_dir"], "train_examples": len(trainer.train_examples)}
        published, version = publish_model_embeddings(result["model_dir"], store, store_dir)
        report["published_embeddings"] = {"items": published, "model_version": version}

        services = start_services(
            stack, bootstrap=bootstrap, topic=TOPIC, group="plexrec-quickstart", store_dir=store_dir,
            models=home / "run" / "models", logs=home / "logs", metrics=True, serve_flags=["--reload-seconds", "1"],
            # exports more often than its default (30 s): the demo's stream lasts seconds
            learn_flags=["--export-seconds", str(LEARN_EXPORT_SECONDS), "--poll-seconds", "0.5"])
        client, children, target = services.client, services.children, services.target

        demo = _demo(tables, past, future, client, children, bootstrap, store, args, report, trainer)
        report["seconds"] = round(time.monotonic() - started, 1)
        write_report(home, report, demo, trainer, tables.title_of())
        print_summary(report, demo, home, tables.title_of())
        if args.serve:
            items = ",".join(str(i) for i in list(demo["before"])[:3])
            print(f"\nserving on {target} (metrics http://127.0.0.1:{services.metrics_port}/metrics), ingesting {TOPIC} "
                  f"from {bootstrap}. Try:\n  .venv/bin/plexrec score --target {target} --user {demo['user']} "
                  f"--items {items} --rank 3\n  .venv/bin/plexrec replay --schema {schema_path} "
                  f"--bootstrap-servers {bootstrap} --limit 100\nCtrl-C stops everything.", flush=True)
            _wait_for_interrupt(children)
    return report


def request_context(rows: pd.DataFrame, schema) -> dict[str, str]:
    """The context a caller would send for these rows: each context column's most common value."""
    context = {}
    for column in schema.context.columns:
        values = rows[column].dropna()
        if len(values):
            context[column] = value_text(values.mode().iloc[0])
    return context


def _demo(tables, past, future, client, children, bootstrap, store, args, report, trainer) -> dict:
    """Rank for the user with the most new behaviours; replay the first half of the future until the
    served model has learned it, compare it with the frozen model on the second half; replay that,
    rank again."""
    schema = tables.schema
    user_column, item_column = schema.user, schema.item
    past_behaviours = past[behaviour_mask(past, schema)]
    future_behaviours = future[behaviour_mask(future, schema)]
    # a user the model already knows (the most past behaviours among those with new ones), with the most new ones
    known = past_behaviours[user_column].value_counts()
    newcomers = future_behaviours[user_column].value_counts()
    candidates_users = newcomers[newcomers.index.isin(known[known >= min(20, known.max())].index)]
    if candidates_users.empty:
        raise RuntimeError("no user has behaviours both before and after the cut; raise --users or "
                           "--replay-fraction")
    user = int(candidates_users.index[0])
    # items the user has not interacted with, before or after the cut: what to show next
    seen = set(past.loc[past[user_column] == user, item_column]) | set(future.loc[future[user_column] == user,
                                                                                   item_column])
    popular = past_behaviours[item_column].value_counts().index
    candidates = [int(i) for i in popular if i not in seen][:1000]
    context = request_context(future[future[user_column] == user], schema)
    before = dict(zip(candidates, client.score(user, candidates, context=context)[0]))

    events = schema_events(future, schema)  # in time order
    halves = [events[:len(events) // 2], events[len(events) // 2:]]
    directory = Path(report["data_dir"]) / "store"
    producer = EventProducer(bootstrap, TOPIC)
    replay_started = time.monotonic()
    sent = producer.send_all(_progress(halves[0], "replaying events (first half)", args.no_progress),
                             rate_per_second=args.rate or None)
    first_ids = len({event.event_id for event in halves[0]})  # a data set's duplicate rows are one event
    served = wait_for(lambda: _serves_a_model_of_every_logged_event(client, directory, first_ids),
                      "the served model to learn the first half", 300, children)
    version = client.score(user, candidates[:1], context=context)[1]
    report["learning"] = {"events": len(halves[0]), "served_version": version,
                          "seconds_from_replay_end_to_served": round(served, 2),
                          "seconds_from_first_event_to_served": round(time.monotonic() - replay_started, 2),
                          **_next_window_auc(tables, past, future, trainer, Path(report["data_dir"]), version)}
    log.info("the served model %s learned the first %d events %.1f s after their replay ended; on the next "
             "window AUC %.4f (frozen: %.4f)", version, len(halves[0]), served, report["learning"]["updated_auc"],
             report["learning"]["frozen_auc"])
    sent += producer.send_all(_progress(halves[1], "replaying events (second half)", args.no_progress),
                              rate_per_second=args.rate or None)
    producer.close()
    log.info("replayed %d events to %s in %.1f s", sent, TOPIC, time.monotonic() - replay_started)

    online = OnlineFeatures(store, read_store_meta(Path(report["data_dir"]) / "store"))
    expected = int((past_behaviours[user_column] == user).sum() + (future_behaviours[user_column] == user).sum())
    catch_up = wait_for(lambda: online.user(user).interaction_count >= expected,
                        f"the ingester to apply user {user}'s events", 300, children)
    after = dict(zip(candidates, client.score(user, candidates, context=context)[0]))
    # one row per event id: a data set's exact duplicate rows are one event (KuaiRand has some)
    distinct = len({event.event_id for event in events})
    wait_for(lambda: len(read_event_log(directory)) >= distinct, "every event in the offline log", 300, children)
    latencies = []
    for _ in range(10):  # the candidates' item vectors are computed on first sight: warm them first
        client.score(user, candidates[:100], context=context)
    for _ in range(200):
        call_started = time.perf_counter()
        client.score(user, candidates[:100], context=context)
        latencies.append((time.perf_counter() - call_started) * 1000)
    ingested = read_event_log(directory)
    report["events"] = {"replayed": sent, "distinct_event_ids": distinct, "in_offline_log": len(ingested),
                        "seconds_from_replay_end_to_user_visible": round(catch_up, 2)}
    report["demo"] = {"user": user, "new_behaviours": int((future_behaviours[user_column] == user).sum()),
                      "candidates": len(candidates), "context": context,
                      "max_score_change": float(max(abs(after[i] - before[i]) for i in candidates))}
    report["serving"] = {"p50_ms_100_candidates": float(np.percentile(latencies, 50)),
                         "p99_ms_100_candidates": float(np.percentile(latencies, 99))}
    latest = future_behaviours[future_behaviours[user_column] == user]
    label = schema.rating or schema.label
    return {"user": user, "before": before, "after": after,
            "latest": list(zip(latest[item_column].tolist(), latest[label].tolist()))[-5:]}


def _serves_a_model_of_every_logged_event(client, directory: Path, at_least: int) -> bool:
    """Whether the event log holds ``at_least`` events and the model the server answers with learned up
    to the last of each position (its manifest's offsets, recsys/learn.py)."""
    logged = read_event_log(directory)
    if len(logged) < at_least:
        return False
    version = client.score(0, [0])[1]
    learned = learned_offsets(read_manifest(directory.parent / "run" / "models" / version))
    return all(learned.get(position, -1) >= offset for position, offset in last_offsets(logged).items())


def _next_window_auc(tables, past, future, trainer, home: Path, version: str) -> dict:
    """AUC on the second half of the replay (not streamed yet) of the model trained before the replay
    and of the served one, which has learned the first half; each event with the features of its time
    (the direct loader over the whole data)."""
    schema = tables.schema
    frame = pd.concat([past, future], ignore_index=True)
    examples = build_examples(tables.with_interactions(frame).joined(), schema)
    learned_until = future[schema.timestamp].iloc[len(future) // 2 - 1]  # the first half's last instant
    window = examples.subset(np.flatnonzero(examples.timestamp > learned_until))
    model, manifest = load_model(home / "run" / "models" / version)
    window = window.keep_dense(manifest["dense_features"])
    features, history_length = model_inputs(trainer.config, window.feature_names)
    with torch.inference_mode():
        updated = np.concatenate([torch.sigmoid(model(b.dense, b.sparse)).numpy() for b in iterate_batches(
            window, features, 4096, shuffle=False, history_length=history_length)])
    frozen = trainer.predict(window.keep_dense(trainer.config.data.dense))
    return {"next_window_events": len(window), "frozen_auc": float(auc(window.label, frozen)),
            "updated_auc": float(auc(window.label, updated))}


def _progress(events, description: str, disable: bool):
    from tqdm import tqdm

    return tqdm(events, desc=description, unit="event", disable=disable, file=sys.stderr)


def _wait_for_interrupt(children: dict[str, subprocess.Popen]) -> None:
    try:
        while all(p.poll() is None for p in children.values()):
            time.sleep(1)
        died = [name for name, p in children.items() if p.poll() is not None]
        log.error("%s exited; stopping", ", ".join(died))
    except KeyboardInterrupt:
        log.info("Ctrl-C: stopping")


def top(scores: dict[int, float], k: int = TOP) -> list[tuple[int, float]]:
    return sorted(scores.items(), key=lambda pair: -pair[1])[:k]


def _name(names: dict, item) -> str:
    return str(names.get(item, f"item {item}"))


def print_summary(report: dict, demo: dict, home: Path, names: dict) -> None:
    test = report["training"]["test"]
    print(f"\nplexrec quickstart on {report['dataset']}: done in {report['seconds']:.0f} s", flush=True)
    print(f"  trained: test AUC {test['auc']:.4f}, GAUC {test['gauc']:.4f}, log loss {test['logloss']:.4f}")
    print(f"  published {report['published_embeddings']['items']} item embeddings "
          f"(model {report['published_embeddings']['model_version']})")
    print(f"  replayed {report['events']['replayed']:,} events through Kafka; "
          f"{report['events']['in_offline_log']:,} in the offline event log")
    print(f"  serving: p50 {report['serving']['p50_ms_100_candidates']:.1f} ms for 100 candidates")
    learning = report["learning"]
    print(f"  learning: the served model learned the first {learning['events']:,} replayed events "
          f"{learning['seconds_from_replay_end_to_served']:.1f} s after their replay ended (version "
          f"{learning['served_version']}); AUC on the next {learning['next_window_events']:,} events: "
          f"{learning['updated_auc']:.4f} (the model before the replay: {learning['frozen_auc']:.4f})")
    context = "".join(f", context {k}={v}" for k, v in report["demo"]["context"].items())
    print(f"\nuser {demo['user']}: top {TOP} of {report['demo']['candidates']} unseen popular items{context}, before "
          f"and after their {report['demo']['new_behaviours']} new behaviours arrived through Kafka")
    latest = ", ".join(f"{_name(names, item)} ({value:g})" for item, value in demo["latest"])
    print(f"  latest new behaviours (label column value): {latest}")
    print(f"  the ingester made them visible {report['events']['seconds_from_replay_end_to_user_visible']:.1f} s "
          f"after the replay ended")
    print(f"  {'before':<46} {'after':<46}")
    for (b_item, b_score), (a_item, a_score) in zip(top(demo["before"]), top(demo["after"])):
        print(f"  {b_score:.3f} {_name(names, b_item)[:40]:<40} {a_score:.3f} {_name(names, a_item)[:40]:<40}")
    print(f"\nreport: {home / 'report.md'}")


def write_report(home: Path, report: dict, demo: dict, trainer, names: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shutil.copy(trainer.out_dir / "training.png", home / "training.png")
    items = list(demo["before"])
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter([demo["before"][i] for i in items], [demo["after"][i] for i in items], s=6, alpha=0.5)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    ax.set_xlabel("score before the new events"), ax.set_ylabel("score after")
    ax.set_title(f"{report['dataset']}, user {demo['user']}: {len(items)} candidates")
    fig.tight_layout()
    fig.savefig(home / "scores_before_after.png", dpi=100)
    plt.close(fig)

    (home / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    test = report["training"]["test"]
    lines = [f"# plexrec quickstart: {report['dataset']}", "", f"Schema: `{report['schema']}`", "",
             "| stage | result |", "|---|---|",
             f"| training | {report['training']['epochs']} epochs, {report['training']['train_examples']:,} train "
             f"examples from the store, test AUC {test['auc']:.4f}, GAUC {test['gauc']:.4f}, "
             f"log loss {test['logloss']:.4f} |",
             f"| published embeddings | {report['published_embeddings']['items']:,} items, model "
             f"{report['published_embeddings']['model_version']} |",
             f"| events | {report['events']['replayed']:,} replayed through Kafka, "
             f"{report['events']['in_offline_log']:,} in the offline log |",
             f"| serving | p50 {report['serving']['p50_ms_100_candidates']:.1f} ms, p99 "
             f"{report['serving']['p99_ms_100_candidates']:.1f} ms (100 candidates) |",
             f"| learning from the stream | the served model learned the first {report['learning']['events']:,} "
             f"replayed events {report['learning']['seconds_from_replay_end_to_served']:.1f} s after their replay "
             f"ended (version {report['learning']['served_version']}); next {report['learning']['next_window_events']:,}"
             f" events: AUC {report['learning']['updated_auc']:.4f} updated, {report['learning']['frozen_auc']:.4f} "
             f"frozen |",
             f"| freshness demo | user {demo['user']}, {report['demo']['new_behaviours']} new behaviours, largest "
             f"score change {report['demo']['max_score_change']:.3f} |", "",
             "![training](training.png) ![scores](scores_before_after.png)", "",
             f"## User {demo['user']}: top {TOP} before and after", "",
             "| before | score | after | score |", "|---|---|---|---|"]
    for (b_item, b_score), (a_item, a_score) in zip(top(demo["before"]), top(demo["after"])):
        lines.append(f"| {_name(names, b_item)} | {b_score:.3f} | {_name(names, a_item)} | {a_score:.3f} |")
    (home / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="plexrec quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--schema", default=str(MOVIELENS_SCHEMA),
                        help="the data set's schema file (default: MovieLens 100K, data/ml-100k/schema.yaml)")
    parser.add_argument("-c", "--config", help="run config (default: configs/ml100k_sequence.yaml for MovieLens, "
                                               "configs/quickstart.yaml for any other schema)")
    parser.add_argument("--data-dir", help="where to work (default: $PLEXREC_DATA_DIR or .plexrec); "
                                           "its quickstart/ folder is emptied first")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the config's)")
    parser.add_argument("--users", type=int, help="only the first N users by id (a quick, smaller run)")
    parser.add_argument("--replay-fraction", type=float, default=0.2, help="the latest share of interactions "
                                                                           "replayed as events")
    parser.add_argument("--rate", type=float, default=0.0, help="replay rate in events/s (0: as fast as possible)")
    parser.add_argument("--serve", action="store_true", help="keep the server and the ingester running")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not 0 < args.replay_fraction < 1:
        parser.error("--replay-fraction must be between 0 and 1")
    configure_logging()
    args.data_dir = args.data_dir or os.environ.get("PLEXREC_DATA_DIR")

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    # a shell starting us in the background sets SIGINT to "ignore", and Python then keeps it
    # ignored: Ctrl-C (or a supervisor's SIGINT) must still stop everything
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run(args)
    except KeyboardInterrupt:
        sys.exit("plexrec quickstart: interrupted; every process it started is stopped")
    except RuntimeError as exc:
        sys.exit(f"plexrec quickstart: {exc}")


if __name__ == "__main__":
    main()
