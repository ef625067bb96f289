"""The Kafka connection flags (features/kafka_options.py): their refusals without a broker, then
kafka-python clients built from them, and `plexrec replay` -> `plexrec ingest`, over TLS, SASL
(PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), SASL over TLS and mutual TLS.

The embedded tansu 0.6.0 serves none of these itself (tests/support/secure_front.py says why), so the
secured brokers here are tansu behind ``SecureFront``: TLS by Python's ssl module, SASL checked
by the front, Kafka by tansu. What these tests prove is the clients' side: that the flags
become the right kafka-python settings, that the handshakes and credentials work, and that
a wrong password, an untrusted certificate or a missing client certificate is refused, with
the cause in the log and within a bounded time, not a hang.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError

from features.broker import BrokerError
from features.kafka_options import (
    PASSWORD_ENV,
    USERNAME_ENV,
    KafkaOptionsError,
    add_kafka_arguments,
    kafka_options,
    replication_factor,
)
from tests.support.secure_front import secured_broker

USERS = {"alice": "alice-Secret-1", "bob": "b0b,with=odd chars"}
REFUSAL_SECONDS = 2  # how long a client tries before a refused connection becomes an error here


@pytest.fixture(autouse=True)
def no_kafka_environment(monkeypatch):
    monkeypatch.delenv(USERNAME_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)


def parse(argv: list[str], creates_topics: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_kafka_arguments(parser, creates_topics=creates_topics)
    return parser.parse_args(argv)


def options(argv: list[str]) -> dict:
    return kafka_options(parse(argv))


def password_file(directory: Path, password: str, name: str = "password") -> str:
    path = directory / name
    path.write_text(password + "\n")
    path.chmod(0o600)
    return str(path)


def topic() -> str:
    return f"secure-{uuid.uuid4().hex[:8]}"


# ---- the flags alone -------------------------------------------------------------------------

def test_plaintext_is_the_default_and_adds_nothing():
    assert options(["--bootstrap-servers", "k:9092"]) == {"bootstrap_servers": "k:9092",
                                                          "security_protocol": "PLAINTEXT"}


def test_a_sasl_protocol_without_a_mechanism_is_refused(tmp_path):
    with pytest.raises(KafkaOptionsError, match="needs --sasl-mechanism"):
        options(["--bootstrap-servers", "k:9092", "--security-protocol", "SASL_SSL", "--sasl-username", "u",
                 "--sasl-password-file", password_file(tmp_path, "p")])


@pytest.mark.parametrize("flag", [["--sasl-mechanism", "PLAIN"], ["--sasl-username", "u"],
                                  ["--sasl-password-file", "FILE"]])
@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL"])
def test_sasl_flags_without_a_sasl_protocol_are_refused(tmp_path, flag, protocol):
    flag = [password_file(tmp_path, "p") if part == "FILE" else part for part in flag]
    with pytest.raises(KafkaOptionsError, match="--security-protocol SASL_SSL"):
        options(["--bootstrap-servers", "k:9092", "--security-protocol", protocol, *flag])


@pytest.mark.parametrize("flag", ["--ssl-cafile", "--ssl-certfile", "--ssl-keyfile"])
@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SASL_PLAINTEXT"])
def test_tls_files_without_a_tls_protocol_are_refused(tmp_path, flag, protocol):
    (tmp_path / "f.pem").write_text("x")
    sasl = ["--sasl-mechanism", "PLAIN", "--sasl-username", "u", "--sasl-password-file",
            password_file(tmp_path, "p")] if protocol.startswith("SASL") else []
    with pytest.raises(KafkaOptionsError, match="--security-protocol SSL"):
        options(["--bootstrap-servers", "k:9092", "--security-protocol", protocol, *sasl, flag,
                 str(tmp_path / "f.pem")])


def test_a_missing_tls_file_is_refused_before_connecting(tmp_path):
    with pytest.raises(KafkaOptionsError, match="--ssl-cafile .*no such file"):
        options(["--bootstrap-servers", "k:9092", "--security-protocol", "SSL", "--ssl-cafile",
                 str(tmp_path / "absent.pem")])


def test_a_missing_or_empty_password_file_is_refused(tmp_path):
    base = ["--bootstrap-servers", "k:9092", "--security-protocol", "SASL_SSL", "--sasl-mechanism",
            "SCRAM-SHA-512", "--sasl-username", "u", "--sasl-password-file"]
    with pytest.raises(KafkaOptionsError, match="cannot read it"):
        options([*base, str(tmp_path / "absent")])
    with pytest.raises(KafkaOptionsError, match="cannot read it"):
        options([*base, str(tmp_path)])  # a directory
    with pytest.raises(KafkaOptionsError, match="is empty"):
        options([*base, password_file(tmp_path, "  \n")])


def test_a_sasl_protocol_without_user_or_password_is_refused(tmp_path, monkeypatch):
    base = ["--bootstrap-servers", "k:9092", "--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "PLAIN"]
    with pytest.raises(KafkaOptionsError, match="needs a user and a password"):
        options(base)
    with pytest.raises(KafkaOptionsError, match="needs a user and a password"):
        options([*base, "--sasl-username", "u"])
    with pytest.raises(KafkaOptionsError, match="needs a user and a password"):
        options([*base, "--sasl-password-file", password_file(tmp_path, "p")])
    monkeypatch.setenv(PASSWORD_ENV, "")  # set but empty is no password
    with pytest.raises(KafkaOptionsError, match="needs a user and a password"):
        options([*base, "--sasl-username", "u"])


def test_credentials_fall_back_to_the_environment_and_flags_win(tmp_path, monkeypatch):
    base = ["--bootstrap-servers", "k:9092", "--security-protocol", "SASL_SSL", "--sasl-mechanism", "SCRAM-SHA-256"]
    monkeypatch.setenv(USERNAME_ENV, "env-user")
    monkeypatch.setenv(PASSWORD_ENV, "env-password")
    got = options(base)
    assert (got["sasl_plain_username"], got["sasl_plain_password"]) == ("env-user", "env-password")
    got = options([*base, "--sasl-username", "flag-user", "--sasl-password-file", password_file(tmp_path, "file-pw")])
    assert (got["sasl_plain_username"], got["sasl_plain_password"]) == ("flag-user", "file-pw")  # newline dropped


def test_every_flag_reaches_kafka_python(tmp_path):
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("x")
    got = options(["--bootstrap-servers", "a:1,b:2", "--security-protocol", "SASL_SSL", "--sasl-mechanism",
                   "SCRAM-SHA-512", "--sasl-username", "u", "--sasl-password-file", password_file(tmp_path, "p"),
                   "--ssl-cafile", str(tmp_path / "ca.pem"), "--ssl-certfile", str(tmp_path / "client.pem"),
                   "--ssl-keyfile", str(tmp_path / "client.key")])
    assert got == {"bootstrap_servers": "a:1,b:2", "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                   "sasl_plain_username": "u", "sasl_plain_password": "p", "ssl_cafile": str(tmp_path / "ca.pem"),
                   "ssl_certfile": str(tmp_path / "client.pem"), "ssl_keyfile": str(tmp_path / "client.key")}
    for kind in (KafkaAdminClient, KafkaConsumer, KafkaProducer):  # each accepts every key (no connection made)
        assert set(got) <= set(kind.DEFAULT_CONFIG), kind


def test_unknown_protocols_and_mechanisms_are_argparse_errors(capsys):
    for argv in (["--security-protocol", "sasl_ssl"], ["--sasl-mechanism", "GSSAPI"]):
        with pytest.raises(SystemExit):
            parse(["--bootstrap-servers", "k:9092", *argv])
    assert "invalid choice" in capsys.readouterr().err


def test_replication_factor():
    assert replication_factor(parse(["--bootstrap-servers", "k"])) == 1
    assert replication_factor(parse(["--bootstrap-servers", "k", "--replication-factor", "3"])) == 3
    with pytest.raises(KafkaOptionsError, match="at least 1"):
        replication_factor(parse(["--bootstrap-servers", "k", "--replication-factor", "0"]))
    without = parse(["--bootstrap-servers", "k"], creates_topics=False)
    assert not hasattr(without, "replication_factor") and replication_factor(without) == 1


def test_the_secured_broker_refuses_bad_security_arguments(tmp_path):
    with pytest.raises(BrokerError, match="at least one user"), secured_broker(users={}):
        pass
    with pytest.raises(BrokerError, match="non-empty name and password"), secured_broker(users={"alice": ""}):
        pass
    with pytest.raises(BrokerError, match="needs tls"), secured_broker(tls_client_ca=tmp_path / "ca.pem"):
        pass
    with pytest.raises(BrokerError, match="TLS files"), secured_broker(tls=(tmp_path / "absent.pem", tmp_path / "absent.key")):
        pass
    with pytest.raises(BrokerError, match="give users, tls or both"), secured_broker():
        pass


# ---- certificates and brokers ----------------------------------------------------------------

def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=plexrec test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            cwd=directory)


def make_leaf(directory: Path, name: str, ca: str, extensions: str) -> None:
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
    (directory / f"{name}.ext").write_text(extensions)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and a CA
    that signed neither."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make the test certificates")
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory, "ca")
    make_ca(directory, "other-ca")
    make_leaf(directory, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                                         "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    make_leaf(directory, "client", "ca", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                                         "extendedKeyUsage=clientAuth\n")
    return directory


@pytest.fixture(scope="module")
def sasl_broker():
    with secured_broker(users=USERS) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="module")
def tls_broker(pki):
    with secured_broker(tls=(pki / "server.pem", pki / "server.key")) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="module")
def sasl_tls_broker(pki):
    with secured_broker(users=USERS, tls=(pki / "server.pem", pki / "server.key")) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="module")
def mutual_tls_broker(pki):
    with secured_broker(tls=(pki / "server.pem", pki / "server.key"), tls_client_ca=pki / "ca.pem") as bootstrap:
        yield bootstrap


def sasl_flags(directory: Path, mechanism: str, user: str = "alice", password: str | None = None,
               protocol: str = "SASL_PLAINTEXT") -> list[str]:
    return ["--security-protocol", protocol, "--sasl-mechanism", mechanism, "--sasl-username", user,
            "--sasl-password-file", password_file(directory, USERS.get(user, "x") if password is None else password,
                                                  name=f"pw-{uuid.uuid4().hex[:6]}")]


def round_trip(kafka: dict) -> None:
    """Create a topic, describe it, produce to it, consume it in a group and commit, delete it."""
    name, group = topic(), topic()
    admin = KafkaAdminClient(**kafka, bootstrap_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1)])
        [described] = admin.describe_topics([name])
        assert described["name"] == name and len(described["partitions"]) == 2
        producer = KafkaProducer(**kafka, bootstrap_timeout_ms=10_000, acks="all")
        for i in range(10):
            producer.send(name, key=f"k{i}".encode(), value=f"m{i}".encode())
        producer.flush(10)
        producer.close()
        consumer = KafkaConsumer(name, **kafka, group_id=group, auto_offset_reset="earliest",
                                 enable_auto_commit=False, session_timeout_ms=6000, heartbeat_interval_ms=1000,
                                 max_poll_interval_ms=10_000, consumer_timeout_ms=10_000, bootstrap_timeout_ms=10_000)
        got = []
        for message in consumer:
            got.append(message.value)
            if len(got) == 10:
                break
        consumer.commit()
        committed = {tp.partition: consumer.committed(tp) for tp in consumer.assignment()}  # asks the broker
        consumer.close()
        assert sorted(got) == sorted(f"m{i}".encode() for i in range(10))
        assert len(committed) == 2 and sum(committed.values()) == 10
        admin.delete_topics([name])
        assert name not in admin.list_topics()
    finally:
        admin.close()


def assert_refused(kafka: dict, caplog, cause: str) -> None:
    """The client gives up within the bound, and the log says why."""
    started = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(KafkaError) as raised:
        KafkaProducer(**kafka, bootstrap_timeout_ms=REFUSAL_SECONDS * 1000).close()
    assert isinstance(raised.value, KafkaTimeoutError)  # kafka-python reports "Unable to bootstrap"
    assert time.monotonic() - started < REFUSAL_SECONDS + 5
    assert cause in caplog.text, caplog.text[-3000:]


# ---- SASL ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
def test_sasl_clients_from_the_flags_produce_consume_and_manage_topics(sasl_broker, tmp_path, caplog, mechanism):
    kafka = options(["--bootstrap-servers", sasl_broker, *sasl_flags(tmp_path, mechanism)])
    with caplog.at_level(logging.INFO, logger="plexrec.broker"):
        round_trip(kafka)
    assert f"'alice' logged in with {mechanism}" in caplog.text


def test_a_password_with_commas_and_equals_signs_works_with_scram(sasl_broker, tmp_path):
    kafka = options(["--bootstrap-servers", sasl_broker, *sasl_flags(tmp_path, "SCRAM-SHA-512", user="bob")])
    KafkaAdminClient(**kafka, bootstrap_timeout_ms=10_000).close()


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
def test_a_wrong_password_is_refused_quickly_and_says_so(sasl_broker, tmp_path, caplog, mechanism):
    kafka = options(["--bootstrap-servers", sasl_broker, *sasl_flags(tmp_path, mechanism, password="wrong")])
    assert_refused(kafka, caplog, "SaslAuthenticationFailedError")
    assert f"refused {mechanism} login of 'alice'" in caplog.text


def test_an_unknown_user_is_refused_like_a_wrong_password(sasl_broker, tmp_path, caplog):
    kafka = options(["--bootstrap-servers", sasl_broker, *sasl_flags(tmp_path, "SCRAM-SHA-256", user="mallory")])
    assert_refused(kafka, caplog, "SaslAuthenticationFailedError")


def scram_server_first(bootstrap: str, user: str, mechanism: str = "SCRAM-SHA-256") -> dict[str, str]:
    """The attributes of the server's first SCRAM message to ``user`` (by hand: SaslHandshake v1,
    then SaslAuthenticate v1 with the client's first message)."""
    import re
    import socket
    import struct

    def request(api_key: int, version: int, correlation: int, body: bytes) -> bytes:
        payload = struct.pack(">hhih", api_key, version, correlation, 4) + b"test" + body
        return struct.pack(">i", len(payload)) + payload

    def answer(connection) -> bytes:
        size = struct.unpack(">i", connection.recv(4, socket.MSG_WAITALL))[0]
        return connection.recv(size, socket.MSG_WAITALL)

    host, port = bootstrap.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request(17, 1, 1, struct.pack(">h", len(mechanism)) + mechanism.encode()))
        assert struct.unpack(">ih", answer(connection)[:6]) == (1, 0)  # the mechanism accepted
        first = f"n,,n={user},r={uuid.uuid4().hex}".encode()
        connection.sendall(request(36, 1, 2, struct.pack(">i", len(first)) + first))
        server_first = re.search(rb"r=[^,]+,s=[^,]+,i=\d+", answer(connection)).group().decode()
    return dict(item.split("=", 1) for item in server_first.split(","))


def test_an_unknown_user_gets_one_salt_at_every_try_as_a_known_user_does(sasl_broker):
    """RFC 5802 section 9: a fresh salt per try for an unknown user, a fixed one for a known user,
    tells anyone which users exist. Both are fixed: a user's salt is the same at every try."""
    for user in ("alice", "mallory"):
        salts = {scram_server_first(sasl_broker, user)["s"] for _ in range(3)}
        assert len(salts) == 1, (user, salts)
    assert scram_server_first(sasl_broker, "mallory")["s"] != scram_server_first(sasl_broker, "alice")["s"]
    assert scram_server_first(sasl_broker, "mallory")["i"] == scram_server_first(sasl_broker, "alice")["i"]


def test_a_connection_that_does_not_log_in_is_closed():
    """A client that connects and says nothing holds no connection (nor the front's thread for it)
    past the login timeout."""
    import socket

    with secured_broker(users=USERS, login_timeout_seconds=0.5) as bootstrap:
        host, port = bootstrap.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed by the front
            assert time.monotonic() - started < 5


def test_the_secured_broker_refuses_clients_without_sasl(sasl_broker, caplog):
    """Not vacuous: without credentials nothing gets through the front."""
    assert_refused(options(["--bootstrap-servers", sasl_broker]), caplog, "before authentication")


# ---- TLS -------------------------------------------------------------------------------------

def test_tls_clients_from_the_flags_produce_consume_and_manage_topics(tls_broker, pki):
    round_trip(options(["--bootstrap-servers", tls_broker, "--security-protocol", "SSL",
                        "--ssl-cafile", str(pki / "ca.pem")]))


def test_tls_verifies_the_broker_certificate(tls_broker, pki, caplog):
    """Another CA's bundle, and the system's roots (no --ssl-cafile), do not trust the test CA."""
    for cafile in (["--ssl-cafile", str(pki / "other-ca.pem")], []):
        caplog.clear()
        assert_refused(options(["--bootstrap-servers", tls_broker, "--security-protocol", "SSL", *cafile]), caplog,
                       "CERTIFICATE_VERIFY_FAILED")


def test_a_plaintext_client_gets_nothing_from_a_tls_broker(tls_broker, caplog):
    assert_refused(options(["--bootstrap-servers", tls_broker]), caplog, "Unable to bootstrap")


def test_sasl_over_tls(sasl_tls_broker, pki, tmp_path, caplog):
    kafka = options(["--bootstrap-servers", sasl_tls_broker,
                     *sasl_flags(tmp_path, "SCRAM-SHA-512", protocol="SASL_SSL"), "--ssl-cafile", str(pki / "ca.pem")])
    with caplog.at_level(logging.INFO, logger="plexrec.broker"):
        round_trip(kafka)
    assert "'alice' logged in with SCRAM-SHA-512" in caplog.text
    caplog.clear()
    wrong = options(["--bootstrap-servers", sasl_tls_broker, *sasl_flags(tmp_path, "SCRAM-SHA-512", password="no",
                                                                         protocol="SASL_SSL"),
                     "--ssl-cafile", str(pki / "ca.pem")])
    assert_refused(wrong, caplog, "SaslAuthenticationFailedError")


def test_mutual_tls_needs_the_client_certificate(mutual_tls_broker, pki, caplog):
    base = ["--bootstrap-servers", mutual_tls_broker, "--security-protocol", "SSL", "--ssl-cafile", str(pki / "ca.pem")]
    kafka = options([*base, "--ssl-certfile", str(pki / "client.pem"), "--ssl-keyfile", str(pki / "client.key")])
    admin = KafkaAdminClient(**kafka, bootstrap_timeout_ms=10_000)
    name = topic()
    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    assert name in admin.list_topics()
    admin.close()
    assert_refused(options(base), caplog, "Unable to bootstrap")


# ---- the commands ----------------------------------------------------------------------------

@pytest.fixture
def small_store(tmp_path):
    """A MovieLens store holding the users and movies of the last 10% of ratings' first 200."""
    from features.events import replay_events
    from features.load import load_into_store
    from features.store import open_store
    from features.movielens import movielens_schema, movielens_tables
    from features.tables import DatasetTables

    schema = movielens_schema()
    events = replay_events(schema, after_fraction=0.9, limit=200)
    catalogue = movielens_tables(schema)
    users = catalogue.users[catalogue.users.user_id.isin({e.user_id for e in events})].reset_index(drop=True)
    items = catalogue.items[catalogue.items.item_id.isin({e.item_id for e in events})].reset_index(drop=True)
    placeholder = pd.DataFrame({"user_id": [users.user_id.iloc[0]], "item_id": [items.item_id.iloc[0]],
                                "rating": [5], "timestamp": [1]})
    directory = tmp_path / "store"
    store = open_store("local", directory)
    load_into_store(store, DatasetTables(schema, placeholder, users, items), directory, history_length=200)
    return directory, events


def plexrec(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plexrec.cli", *argv], capture_output=True, text=True, check=False,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})})


def test_replay_then_ingest_over_sasl_and_tls(sasl_tls_broker, pki, small_store, tmp_path):
    """`plexrec replay` publishes with a password file; `plexrec ingest` reads the password from the
    environment; both trust the test CA. Every replayed event reaches the offline log."""
    from features.event_log import read_event_log

    directory, events = small_store
    name = topic()
    tls = ["--ssl-cafile", str(pki / "ca.pem")]
    replayed = plexrec("replay", "--bootstrap-servers", sasl_tls_broker, *sasl_flags(tmp_path, "SCRAM-SHA-512",
                                                                                     protocol="SASL_SSL"), *tls,
                       "--topic", name, "--rate", "0", "--after-fraction", "0.9", "--limit", "200")
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    ingested = plexrec("ingest", "--bootstrap-servers", sasl_tls_broker, "--security-protocol", "SASL_SSL",
                       "--sasl-mechanism", "SCRAM-SHA-256", "--sasl-username", "bob", *tls, "--replication-factor",
                       "1", "--topic", name, "--group", name, "--data-dir", str(directory), "--stop-after-idle", "3",
                       env={PASSWORD_ENV: USERS["bob"]})
    assert ingested.returncode == 0, ingested.stderr[-2000:]
    log = read_event_log(directory)
    assert sorted(log["event_id"]) == sorted(e.event_id for e in events)


def test_the_commands_refuse_a_bad_combination_before_connecting(tmp_path):
    for command in ("replay", "ingest"):
        done = plexrec(command, "--bootstrap-servers", "127.0.0.1:1", "--security-protocol", "SASL_SSL",
                       "--sasl-username", "u", timeout=60)
        assert done.returncode != 0 and "needs --sasl-mechanism" in done.stderr, (command, done.stderr[-1000:])
