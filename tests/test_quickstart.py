"""The quickstart end to end on slices of ML-100K and KuaiRand: every stage really ran, and it cleans up."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def children_of(pid: int) -> list[int]:
    """Every process below ``pid`` (by /proc), so the test sees what the quickstart started."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def test_quickstart_runs_every_stage_serves_and_stops_everything_on_ctrl_c(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "plexrec.cli", "quickstart", "--users", "150", "--epochs", "1", "--data-dir",
         str(tmp_path), "--no-progress", "--serve"],
        stdout=subprocess.PIPE, stderr=(tmp_path / "quickstart.log").open("w"), text=True)
    # stderr goes to a file: an undrained pipe fills up and blocks the quickstart's logging
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    output, deadline = [], time.monotonic() + 400
    while not any(line.startswith("serving on") for line in output):
        assert process.poll() is None, (tmp_path / "quickstart.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the quickstart did not reach --serve in time"
        try:
            output.append(lines.get(timeout=1))
        except queue.Empty:
            pass
    target = next(line for line in output if line.startswith("serving on")).split()[2]
    running = children_of(process.pid)
    assert len(running) >= 4  # broker, ingester, server, learner

    # --serve keeps the server answering
    score = subprocess.run([sys.executable, "-m", "plexrec.cli", "score", "--target", target, "--user", "1",
                            "--items", "1,2,3"], capture_output=True, text=True, timeout=60)
    assert score.returncode == 0, score.stderr

    process.send_signal(signal.SIGINT)  # Ctrl-C: how --serve is meant to end
    process.wait(timeout=60)
    log = (tmp_path / "quickstart.log").read_text()
    assert process.returncode == 0, log[-3000:]
    assert "stopped plexrec serve" in log and "stopped plexrec ingest" in log and "broker" in log
    assert "stopped plexrec learn" in log
    time.sleep(0.5)
    assert not [pid for pid in running if Path(f"/proc/{pid}").exists()
                and "zombie" not in Path(f"/proc/{pid}/status").read_text()]

    home = tmp_path / "quickstart"
    report = json.loads((home / "report.json").read_text())
    assert report["training"]["test"]["auc"] > 0.6  # a trained model, well above chance
    assert report["published_embeddings"]["items"] > 1000
    assert report["events"]["replayed"] > 1000
    assert report["events"]["in_offline_log"] == report["events"]["replayed"]  # every event ingested
    assert report["demo"]["max_score_change"] > 1e-3  # the new events changed the user's scores
    assert (home / "training.png").stat().st_size > 10_000
    assert (home / "scores_before_after.png").stat().st_size > 10_000
    assert "| training |" in (home / "report.md").read_text()
    # the stream reached a model: the server answered with a version the learner exported, which had
    # learned the first half of the replay; both models were scored on the second half
    learning = report["learning"]
    versions = sorted(p.name for p in (home / "run" / "models").iterdir())
    # (the learner keeps its newest 10 versions: the one served then may be gone since)
    assert len(versions) >= 2 and learning["served_version"] > versions[0]
    assert learning["next_window_events"] > 500 and 0.5 < learning["frozen_auc"] < 1
    assert 0.5 < learning["updated_auc"] < 1 and learning["seconds_from_replay_end_to_served"] < 120

    # the store itself, read independently of the report
    from features.online import OnlineFeatures
    from features.store import open_store

    online = OnlineFeatures(open_store("local", home / "store"))
    item = online.items([1])[1]
    assert item.model_version in versions[1:]  # the learner publishes what its versions changed
    assert len(item.representation_embedding) > 0 and len(item.attention_embedding) > 0
    user = online.user(report["demo"]["user"])
    assert len(user.history_item_ids) == 200 and user.interaction_count > report["demo"]["new_behaviours"]


def test_quickstart_runs_the_whole_loop_on_kuairand(tmp_path):
    """Another schema through every stage: impressions, clicked-only histories, ms timestamps, the
    user and video tables, `tab` as the request context; the replay is KuaiRand's own later rows."""
    done = subprocess.run(
        [sys.executable, "-m", "plexrec.cli", "quickstart", "--schema", "data/kuairand-pure/schema.yaml",
         "--users", "2000", "--epochs", "2", "--data-dir", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plexrec quickstart on kuairand-pure" in done.stdout
    report = json.loads((tmp_path / "quickstart" / "report.json").read_text())
    assert report["dataset"] == "kuairand-pure"
    assert report["training"]["test"]["auc"] > 0.65  # 2,000 users, two epochs: well above chance (0.72 seen)
    assert report["published_embeddings"]["items"] == 7_583  # the whole video catalogue
    events = report["events"]
    assert events["replayed"] > 300 and events["in_offline_log"] == events["distinct_event_ids"] > 0.9 * events["replayed"]
    assert "tab" in report["demo"]["context"]  # scored with the data set's own request context
    assert report["demo"]["max_score_change"] > 1e-4  # the user's new clicks reached their scores

    from features.online import OnlineFeatures
    from features.store import open_store

    online = OnlineFeatures(open_store("local", tmp_path / "quickstart" / "store"))
    user = online.user(report["demo"]["user"])
    assert user.interaction_count >= report["demo"]["new_behaviours"] > 0
    assert min(user.history_timestamps) > 1_600_000_000_000  # milliseconds, as the schema says


def test_quickstart_with_a_wrong_schema_fails_at_once_naming_it(tmp_path):
    schema = tmp_path / "schema.yaml"
    schema.write_text("path: events.csv\nuser: u\nitem: i\ntimestamp: t\nlabel: click\ncontext: {categoricals: [a]}\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "plexrec.cli", "quickstart", "--schema", str(schema),
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "schema context: unknown key(s) ['categoricals']" in done.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "quickstart").exists()  # before any process
