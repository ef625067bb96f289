"""A Prometheus registry of its own and the HTTP endpoint that exposes it: the ingester's and the
scoring server's metrics build on it (several of either run in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


class MetricsEndpoint:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http = None

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the port (a free one for ``port=0``)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
