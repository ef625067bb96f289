"""A small Python client of the scoring service, and ``plexrec score``.

    from serving.client import ScoringClient
    with ScoringClient("127.0.0.1:50051") as client:
        scores, version = client.score(user_id=42, item_ids=[1, 2, 3])
        best = client.rank(user_id=42, item_ids=[1, 2, 3], k=2)   # [(item, score), ...]

    plexrec score --user 42 --items 1,2,3 [--context tab=1 ...] [--rank 2] [--target HOST:PORT]
                  [--tls | --tls-ca ca.pem] [--token-file F]

No torch: a client process needs grpcio and the generated code only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from protos.plexrec.v1 import scoring_pb2, scoring_pb2_grpc
from serving.auth import TokenError, read_token


class ScoringClient:
    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False, timeout: float = 5.0) -> None:
        if root_certificates:  # a private CA
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates))
        elif tls:  # no arguments: gRPC's default roots (grpcio's public CAs, or $GRPC_DEFAULT_SSL_ROOTS_FILE_PATH)
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials())
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = scoring_pb2_grpc.ScoringStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout

    def score(self, user_id: int, item_ids: list[int], *, context: dict[str, str] | None = None,
              request_id: str = "") -> tuple[list[float], str]:
        """One click probability per item (request order), and the model version."""
        request = scoring_pb2.ScoreRequest(user_id=user_id, item_ids=item_ids, context=context or {},
                                           request_id=request_id)
        response = self.stub.Score(request, timeout=self.timeout, metadata=self.metadata)
        return list(response.scores), response.model_version

    def rank(self, user_id: int, item_ids: list[int], k: int = 0, *, context: dict[str, str] | None = None,
             request_id: str = "") -> list[tuple[int, float]]:
        """The k best items (0: all), best first, as (item id, score)."""
        request = scoring_pb2.RankRequest(user_id=user_id, item_ids=item_ids, k=k, context=context or {},
                                          request_id=request_id)
        response = self.stub.Rank(request, timeout=self.timeout, metadata=self.metadata)
        return [(scored.item_id, scored.score) for scored in response.items]

    def serving(self) -> bool:
        """True when the server's standard health check answers SERVING (no token needed)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            answer = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_items(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--items must be comma-separated integer ids, got {text!r}") from None


def parse_context_entry(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"--context takes key=value (e.g. tab=1), got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="plexrec score", description="Score items for a user on a running "
                                                                       "plexrec serve.")
    parser.add_argument("--target", default="127.0.0.1:50051", help="the server, host:port")
    parser.add_argument("--user", type=int, required=True, help="user id")
    parser.add_argument("--items", type=parse_items, required=True, help="candidate item ids, e.g. 1,2,3")
    parser.add_argument("--context", type=parse_context_entry, action="append", default=[], metavar="KEY=VALUE",
                        help="a context feature of the call, e.g. tab=1 (repeat for several); the data set's "
                             "schema declares which the model reads")
    parser.add_argument("--rank", type=int, metavar="K", help="return the K best, best first, instead of scores")
    parser.add_argument("--tls", action="store_true",
                        help="TLS, the server's certificate checked against gRPC's default root certificates "
                             "(the public CAs; $GRPC_DEFAULT_SSL_ROOTS_FILE_PATH names another bundle)")
    parser.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate (TLS with a "
                                         "private CA)")
    parser.add_argument("--token-file", help="bearer token file (or set $PLEXREC_TOKEN)")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    args = parser.parse_args(argv)
    try:
        token = read_token(args.token_file)
    except TokenError as exc:
        sys.exit(f"plexrec score: {exc}")
    ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    context = dict(args.context)
    with ScoringClient(args.target, token=token, root_certificates=ca, tls=args.tls, timeout=args.timeout) as client:
        try:
            if args.rank is not None:
                rows = client.rank(args.user, args.items, args.rank, context=context)
                version = None
            else:
                scores, version = client.score(args.user, args.items, context=context)
                rows = list(zip(args.items, scores))
        except grpc.RpcError as exc:
            hint = (f" (is `plexrec serve` running at {args.target}? set --target)"
                    if exc.code() == grpc.StatusCode.UNAVAILABLE else "")
            sys.exit(f"plexrec score: {exc.code().name}: {exc.details()}{hint}")
    print(f"{'item':>10}  {'score':>8}")
    for item, score in rows:
        print(f"{item:>10}  {score:8.4f}")
    if version:
        print(f"model {version}")


if __name__ == "__main__":
    main()
