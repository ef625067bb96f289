"""The salted multi-probe hash of unified embedding: raw id -> table row.

This hash is part of every model's contract: training, serving and any exported
artifact must map a raw id to exactly the same rows, on any process or machine.
It is therefore written once, here, with plain int64 tensor ops (no Python
``hash()``, no platform-dependent library), pinned by golden values in
``tests/test_hashing.py``, and its name and version travel in every exported
model's manifest.

Definition (all arithmetic modulo 2**64):

    salt(f, p)      = fnv1a64(utf8(f"{f}#{p}"))
    mix(x)          = splitmix64 finaliser of x
    row(v, f, p, N) = (mix(v XOR mix(salt(f, p))) >> 1) mod N

The shift by one makes the value non-negative as an int64 before the modulo.
Strings (gender, occupation, zip prefix, ...) become raw ids on the data side, before
this hash (features/ids.py: ``string_to_id`` = fnv1a64 of the UTF-8 bytes with the top bit
cleared); ``fnv1a64`` is the same function here.
"""

from __future__ import annotations

import torch

from features.ids import fnv1a64

HASH_NAME = "splitmix64-salted"
HASH_VERSION = 1

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _as_int64(unsigned: int) -> int:
    """The int64 with the same 64 bits as an unsigned 64-bit integer."""
    return unsigned - (1 << 64) if unsigned >= (1 << 63) else unsigned


def _xor_logical_shift_right_(x: torch.Tensor, bits: int) -> None:
    """x ^= x >>> bits, in place. torch's >> on int64 is arithmetic: the sign-extended bits are cleared."""
    shifted = x >> bits
    shifted &= (1 << (64 - bits)) - 1
    x ^= shifted


def _mix64_(x: torch.Tensor) -> torch.Tensor:
    # in place on a tensor of the caller's own: on batches of 10^5-10^6 ids a fresh tensor per
    # step cost over twice the arithmetic (allocation and page faults, measured)
    x += _as_int64(_GOLDEN)
    _xor_logical_shift_right_(x, 30)
    x *= _as_int64(_MIX1)
    _xor_logical_shift_right_(x, 27)
    x *= _as_int64(_MIX2)
    _xor_logical_shift_right_(x, 31)
    return x


def mix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on an int64 tensor (wrapping multiplication)."""
    return _mix64_(x.to(torch.int64).clone())


def mixed_salt(feature: str, probe: int) -> int:
    """mix(salt(f, p)) as a signed int64, computed once per (feature, probe) at build time."""
    return _as_int64(_mix64_reference(fnv1a64(f"{feature}#{probe}".encode("utf-8"))))


def hash_rows(values: torch.Tensor, mixed_salt_value: int | torch.Tensor, num_rows: int) -> torch.Tensor:
    """Rows in ``[0, num_rows)`` for raw int64 ids ``values`` under one (mixed) salt, or under a
    tensor of salts that broadcasts against ``values`` (e.g. one per value, or ``[1, probes]``
    against ``[n, 1]`` ids), so many (feature, probe) keys hash in one pass."""
    hashed = _mix64_(values.to(torch.int64) ^ mixed_salt_value)  # ^ gives a new tensor
    hashed >>= 1
    hashed &= (1 << 63) - 1  # the logical shift: non-negative before the modulo
    return hashed.remainder_(num_rows)


# --- plain-Python reference, used by the tests to prove the tensor version ---


def _mix64_reference(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def hash_row(value: int, mixed_salt_value: int, num_rows: int) -> int:
    """``hash_rows`` of one raw id with Python ints (``mixed_salt``'s value): for a handful of ids
    (one user's features) a dozen tensor ops cost more than the arithmetic."""
    return (_mix64_reference((value ^ mixed_salt_value) & _MASK64) >> 1) % num_rows


def hash_row_reference(value: int, feature: str, probe: int, num_rows: int) -> int:
    """The row of one raw id, computed with unbounded Python ints."""
    mixed_salt = _mix64_reference(fnv1a64(f"{feature}#{probe}".encode("utf-8")))
    return (_mix64_reference((value & _MASK64) ^ mixed_salt) >> 1) % num_rows
