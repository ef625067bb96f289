"""Prometheus metrics of the scoring server, in a registry of its own (several servers per process in tests)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from features.metrics_endpoint import MetricsEndpoint

# 0.5 ms .. 5 s: a cached call takes about a millisecond, a cold 1,000-candidate call hundreds
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServingMetrics(MetricsEndpoint):
    def __init__(self) -> None:
        super().__init__()
        self.calls = Counter("plexrec_calls", "scoring calls received", ["method"], registry=self.registry)
        self.errors = Counter("plexrec_errors", "scoring calls failed, by status code", ["method", "code"],
                              registry=self.registry)
        self.latency = Histogram("plexrec_latency_seconds", "time per call, by stage: feature_fetch, "
                                 "model_inputs, forward, total", ["stage"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.candidates = Histogram("plexrec_candidates", "candidates per call", registry=self.registry,
                                    buckets=(1, 10, 50, 100, 200, 500, 1000, 5000))
        self.batch_calls = Histogram("plexrec_batch_calls", "calls sharing the forward a call was scored in",
                                     registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.model = Gauge("plexrec_model_info", "1 for the model version being served, 0 for earlier ones", ["version"],
                           registry=self.registry)
        self._version: str | None = None

    def model_version(self, version: str) -> None:
        # the old version drops to 0 rather than being removed: `import feast` switches
        # prometheus_client to multi-process mode, which cannot remove labels
        if self._version is not None:
            self.model.labels(self._version).set(0)
        self._version = version
        self.model.labels(version).set(1)
