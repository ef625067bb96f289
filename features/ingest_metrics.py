"""Prometheus metrics of the stream ingester (``plexrec ingest --metrics-port``), in a registry of its own.

Counters follow the ingester's IngestStats after every batch, so the two never disagree.
Consumer lag is the broker's high watermark minus the consumer's position, per partition:
the embedded tansu broker reports its high watermark as the start of the last batch + 1
(see the README), so on tansu the lag reads low by up to one produce batch.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from features.metrics_endpoint import MetricsEndpoint

COMMIT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
COUNTED = {  # IngestStats field -> (metric name, help)
    "events": ("plexrec_ingest_events", "messages read from the event topic"),
    "applied": ("plexrec_ingest_applied", "behaviours applied to user histories"),
    "not_behaviours": ("plexrec_ingest_not_behaviours", "valid events the history rule keeps out"),
    "item_deltas": ("plexrec_ingest_item_deltas", "item deltas read"),
    "item_profiles": ("plexrec_ingest_item_profiles", "item_profile rows written from item attributes"),
    "failed_commits": ("plexrec_ingest_failed_commits", "batches whose offsets a rebalance kept from committing"),
    "conflicting_event_ids": ("plexrec_ingest_conflicting_event_ids",
                              "events whose id was first delivered with another label: dropped (the first wins)"),
}


class IngestMetrics(MetricsEndpoint):
    def __init__(self) -> None:
        super().__init__()
        self.counters = {field: Counter(name, text, registry=self.registry) for field, (name, text) in COUNTED.items()}
        self.duplicates = Counter("plexrec_ingest_duplicates_skipped",
                                  "events that changed nothing: side user|item, rule offset (re-delivered) or "
                                  "event_id (seen in the recent window)", ["side", "rule"], registry=self.registry)
        self.dead_letters = Counter("plexrec_ingest_dead_letters", "messages sent to the dead-letter topic, by reason",
                                    ["reason"], registry=self.registry)
        self.commit_latency = Histogram("plexrec_ingest_commit_seconds", "time to commit a batch's offsets",
                                        buckets=COMMIT_BUCKETS, registry=self.registry)
        self.lag = Gauge("plexrec_ingest_consumer_lag", "messages behind the broker's high watermark",
                         ["topic", "partition"], registry=self.registry)
        self._seen: dict = {}

    def follow(self, stats, commit_seconds: list[float], lags: dict[tuple[str, int], int]) -> None:
        """Bring the metrics up to ``stats`` (cumulative IngestStats) after a batch."""
        for field, counter in self.counters.items():
            self._advance(counter, field, getattr(stats, field))
        user_by_id = stats.duplicate_event_ids
        self._advance(self.duplicates.labels("user", "event_id"), "user_event_id", user_by_id)
        self._advance(self.duplicates.labels("user", "offset"), "user_offset", stats.skipped_duplicates - user_by_id)
        self._advance(self.duplicates.labels("item", "any"), "item_any", stats.skipped_item_duplicates)
        for reason, count in stats.reasons.items():
            self._advance(self.dead_letters.labels(reason), ("reason", reason), count)
        for seconds in commit_seconds:
            self.commit_latency.observe(seconds)
        for (topic, partition), lag in lags.items():
            self.lag.labels(topic, str(partition)).set(lag)

    def _advance(self, counter, key, total: int) -> None:
        counter.inc(total - self._seen.get(key, 0))
        self._seen[key] = total
