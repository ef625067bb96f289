"""What a scoring server is told: one declared set of settings (``plexrec serve``'s flags)."""

from __future__ import annotations

from dataclasses import dataclass

from features.online import DEFAULT_MAX_CACHED_BYTES, DEFAULT_MAX_CACHED_ITEMS


@dataclass
class ServeConfig:
    model_dir: str
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    max_candidates: int = 1000
    max_message_bytes: int = 1 << 20
    max_batch_rows: int = 4096  # concurrent calls scored in one forward, up to this many rows
    # load shedding: candidate rows waiting for the model, and calls in the server at once
    # (None: no limit); past either, calls are refused RESOURCE_EXHAUSTED at once
    max_queued_rows: int = 16384
    max_concurrent_calls: int | None = 256
    # admission by time (serving/batcher.py): a call that would wait longer than this for the model, or be
    # scored after its deadline, is refused at once: RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED (None: the deadline alone)
    max_queue_ms: float | None = 50.0
    reload_seconds: float = 5.0
    item_cache_seconds: float = 60.0
    item_cache_entries: int = DEFAULT_MAX_CACHED_ITEMS
    item_cache_bytes: int = DEFAULT_MAX_CACHED_BYTES
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None  # None: no authentication; "" is refused (it cannot mean "closed")
    reuse_port: bool = False  # share the port with the other workers of `--processes` (serving/processes.py)

    def check(self) -> None:
        """ValueError naming the setting that cannot work."""
        if self.token is not None and not self.token.strip():
            raise ValueError("the bearer token is empty: give the token, or None for no authentication")
        if self.max_queued_rows < self.max_candidates:
            raise ValueError(f"--max-queued-rows {self.max_queued_rows} is below --max-candidates "
                             f"{self.max_candidates}: the largest allowed call could never be queued")
        if self.max_queue_ms is not None and self.max_queue_ms <= 0:
            raise ValueError(f"--max-queue-ms must be above 0, got {self.max_queue_ms} (0 on the command line: no "
                             f"time target)")
        if self.max_concurrent_calls is not None and self.max_concurrent_calls < 1:
            raise ValueError(f"--max-concurrent-calls must be at least 1, got {self.max_concurrent_calls}")
        # a batch of calls is scored in pieces whose items fit the model's item vector cache (ScoringService
        # .score_batch), so only one call's own candidates must fit it
        if self.item_cache_entries < self.max_candidates:
            raise ValueError(f"--item-cache-entries {self.item_cache_entries} is below --max-candidates "
                             f"{self.max_candidates}: a call of that many distinct candidates could never be scored "
                             f"(the model's item vectors are cached per item); raise --item-cache-entries or lower "
                             f"--max-candidates")

    def check_history(self, history_length: int) -> None:
        """ValueError unless one user's history (at most the store's ``history_length`` items) fits the
        item vector cache."""
        if self.item_cache_entries < history_length:
            raise ValueError(f"--item-cache-entries {self.item_cache_entries} is below the store's history length "
                             f"{history_length} (store.json history_length): one user's history could never be "
                             f"scored (the model's item vectors are cached per item); raise --item-cache-entries to "
                             f"at least {history_length}")
