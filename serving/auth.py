"""Where the bearer token comes from, and whether it would cross a network in the clear.

No torch and no gRPC here: ``plexrec serve`` and ``plexrec score`` both read the token,
and the client must stay light.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

TOKEN_VARIABLE = "PLEXREC_TOKEN"


class TokenError(ValueError):
    """The token a command was told to use cannot be used; the message says what to do."""


def read_token(token_file: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token of ``--token-file``, else of $PLEXREC_TOKEN, else None (no authentication).

    A file or variable that was given but holds no usable token is an error, never "no token":
    falling back to no authentication would open a server its operator meant to close.
    """
    if token_file:
        try:
            text = Path(token_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise TokenError(f"cannot read --token-file {token_file} ({problem}): write the token into a "
                             "readable file, or leave out --token-file for no authentication") from None
        return _checked(text, f"--token-file {token_file}")
    if TOKEN_VARIABLE in environ:
        return _checked(environ[TOKEN_VARIABLE], f"${TOKEN_VARIABLE}")
    return None


def _checked(text: str, source: str) -> str:
    token = text.strip()  # the newline an editor or `echo` leaves
    if not token:
        raise TokenError(f"{source} is empty: put the token there (e.g. `openssl rand -hex 32`), or leave it "
                         f"out (no --token-file, ${TOKEN_VARIABLE} unset) for no authentication")
    if not all("!" <= character <= "~" for character in token):
        # it goes into an HTTP/2 header as "Bearer <token>": gRPC would refuse it on every call
        raise TokenError(f"{source}: the token holds whitespace or characters outside printable ASCII; "
                         "a bearer token is one word of printable ASCII")
    return token


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name, or "" / "0.0.0.0"-style wildcards: reachable from outside
        return False
