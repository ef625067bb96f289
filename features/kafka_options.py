"""How to reach a Kafka cluster: one set of flags for every Kafka-facing command.

    --bootstrap-servers HOST:PORT[,...]
    --security-protocol PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL
    --sasl-mechanism PLAIN|SCRAM-SHA-256|SCRAM-SHA-512
    --sasl-username NAME            (or $PLEXREC_KAFKA_USERNAME)
    --sasl-password-file PATH       (or $PLEXREC_KAFKA_PASSWORD; never a flag: flags show in `ps`)
    --ssl-cafile PATH               (default: the system's roots) [--ssl-certfile --ssl-keyfile: mutual TLS]
    --replication-factor N          of the topics a command creates

``kafka_options(args)`` turns them into kafka-python keyword arguments, the same for
consumers, producers and admin clients. A bad combination is refused here, before
any connection, with what to pass instead.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
USERNAME_ENV, PASSWORD_ENV = "PLEXREC_KAFKA_USERNAME", "PLEXREC_KAFKA_PASSWORD"


class KafkaOptionsError(ValueError):
    """The connection flags do not fit together; the message says what to pass."""


def add_kafka_arguments(parser: argparse.ArgumentParser, *, creates_topics: bool = True) -> None:
    group = parser.add_argument_group("Kafka connection")
    group.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap servers, host:port[,...]")
    group.add_argument("--security-protocol", default="PLAINTEXT", choices=SECURITY_PROTOCOLS,
                       help="how to talk to the brokers (default: PLAINTEXT)")
    group.add_argument("--sasl-mechanism", choices=SASL_MECHANISMS,
                       help="SASL mechanism, with --security-protocol SASL_PLAINTEXT or SASL_SSL")
    group.add_argument("--sasl-username", help=f"SASL user (default: ${USERNAME_ENV})")
    group.add_argument("--sasl-password-file", help=f"file holding the SASL password (default: ${PASSWORD_ENV})")
    group.add_argument("--ssl-cafile", help="CA bundle to trust (default: the system's roots)")
    group.add_argument("--ssl-certfile", help="client certificate, for brokers that require mutual TLS")
    group.add_argument("--ssl-keyfile", help="the client certificate's private key")
    if creates_topics:
        group.add_argument("--replication-factor", type=int, default=1,
                           help="replication factor of the topics this command creates (default: 1; "
                                "managed clusters usually want 3)")


def kafka_options(args: argparse.Namespace) -> dict:
    """kafka-python keyword arguments from the parsed flags (bootstrap servers included)."""
    protocol = args.security_protocol
    options: dict = {"bootstrap_servers": args.bootstrap_servers, "security_protocol": protocol}
    uses_sasl, uses_tls = protocol.startswith("SASL_"), protocol.endswith("SSL")
    if uses_sasl:
        if not args.sasl_mechanism:
            raise KafkaOptionsError(f"--security-protocol {protocol} needs --sasl-mechanism "
                                    f"({', '.join(SASL_MECHANISMS)})")
        username = args.sasl_username or os.environ.get(USERNAME_ENV)
        password = _password(args.sasl_password_file)
        if not username or not password:
            raise KafkaOptionsError(f"--security-protocol {protocol} needs a user and a password: pass "
                                    f"--sasl-username (or set ${USERNAME_ENV}) and --sasl-password-file "
                                    f"(or set ${PASSWORD_ENV})")
        options.update(sasl_mechanism=args.sasl_mechanism, sasl_plain_username=username,
                       sasl_plain_password=password)
    elif args.sasl_mechanism or args.sasl_username or args.sasl_password_file:
        raise KafkaOptionsError(f"SASL flags were given but --security-protocol is {protocol}: pass "
                                "--security-protocol SASL_SSL (or SASL_PLAINTEXT)")
    tls_files = {"ssl_cafile": args.ssl_cafile, "ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile}
    given = {key: path for key, path in tls_files.items() if path}
    if given and not uses_tls:
        raise KafkaOptionsError(f"TLS files were given but --security-protocol is {protocol}: pass "
                                "--security-protocol SSL (or SASL_SSL)")
    for key, path in given.items():
        if not Path(path).is_file():
            raise KafkaOptionsError(f"--{key.replace('_', '-')} {path}: no such file")
    options.update(given)
    return options


def unreachable(command: str, args: argparse.Namespace, exc: Exception) -> str | None:
    """The exit message for a kafka-python exception at connection time (no broker, refused
    credentials or TLS), naming the flags to check; None for any other exception."""
    if not type(exc).__module__.startswith("kafka"):
        return None
    return (f"{command}: cannot reach Kafka at {args.bootstrap_servers} ({exc!r}); check --bootstrap-servers "
            "and the --security-protocol / SASL / TLS flags")


def replication_factor(args: argparse.Namespace) -> int:
    factor = getattr(args, "replication_factor", 1)
    if factor < 1:
        raise KafkaOptionsError(f"--replication-factor {factor}: pass at least 1")
    return factor


def _password(path: str | None) -> str | None:
    if path is None:
        return os.environ.get(PASSWORD_ENV)
    try:
        text = Path(path).read_text().rstrip("\r\n")  # spaces may belong to the password
    except OSError as exc:
        raise KafkaOptionsError(f"--sasl-password-file {path}: cannot read it ({exc.strerror})") from None
    if not text.strip():
        raise KafkaOptionsError(f"--sasl-password-file {path} is empty: write the password into it")
    return text
