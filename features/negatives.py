"""Sampled negatives for implicit feedback (a schema's ``implicit`` setting): one definition of the
draw, in plain Python (the reference), numpy (the direct loader) and SQL (the store's examples).

For every positive (a label event labelled 1, at instant t, of user u and item i) and every
k < ``negatives``, rounds of draws:

    j       = k + round * negatives                         (round 0, 1, ... < ``rounds``)
    h       = draw_hash(seed, u, i, t, j)                   uniform in [0, P), P = 2^31 - 1
    m       = catalogue entries at or before t
    rank    = h * m // P                                    (integers: exact in numpy and SQL)
    item    = the catalogue's entry of that rank

The catalogue is built from the behaviours (the rows that enter histories and counters: the
schema's ``history`` rule), in an order every engine can reproduce:

    popularity  every behaviour, ordered by (timestamp, user, item): the entries at or before t
                are the behaviours at or before t, so an item is drawn in proportion to its
                behaviours by then (its frequency up to the instant, what the item counter knows)
    uniform     every item once, ordered by (its first behaviour's timestamp, item): the entries
                at or before t are the items that existed by then

A draw is rejected when the user has an interaction row with that item at or before t (any row,
any label: the positive's own item included); the first accepted round is the k-th negative, and
a (positive, k) rejected in every round is dropped (counted in the log). Draws are with
replacement: two negatives of one positive may be the same item. Nothing here depends on row order
or on which rows are examples, so the store's examples, the direct loader's and a streamed
learner's window draw the same items for the same positive.

The hash uses only +, * and % on integers below 2^31, so every product stays below 2^62: the same
value in Python, numpy int64 and SQL BIGINT (DuckDB, Spark), without wrapping arithmetic. Each mix
step squares (not affine: consecutive j give unrelated h).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.example_sql import label_expression, quote

P = 2_147_483_647  # 2^31 - 1, a prime
MULTIPLIER, INCREMENT = 48_271, 11
SAMPLERS = ("popularity", "uniform")


@dataclass(frozen=True)
class ImplicitRule:
    """A schema's ``implicit`` setting: how many negatives per positive, drawn how."""

    negatives: int = 2
    sampler: str = "popularity"
    seed: int = 0
    rounds: int = 4  # redraws of a rejected (positive, k); after them it is dropped

    @classmethod
    def of(cls, raw) -> ImplicitRule | None:
        return None if raw is None else cls(**raw)


# --- the reference: plain Python integers ---


def _mix(h: int, value: int) -> int:
    x = (h + value % P) % P
    return (x * x % P * MULTIPLIER + INCREMENT) % P


def draw_hash(seed: int, user: int, item: int, timestamp: int, j: int) -> int:
    """A number in [0, P) for draw ``j`` of the positive (user, item, timestamp)."""
    h = _mix(seed % P, 0x5EED)
    for value in (user, item, timestamp, j, 0x9E37):
        h = _mix(h, value)
    return h


def draw_rank(h: int, entries: int) -> int:
    """The catalogue rank a draw picks among ``entries`` (> 0)."""
    return h * entries // P


# --- numpy (int64) ---


def _mix_np(h: np.ndarray, value: np.ndarray) -> np.ndarray:
    x = (h + np.mod(value, P)) % P
    return (x * x % P * MULTIPLIER + INCREMENT) % P


def draw_hash_np(seed: int, user: np.ndarray, item: np.ndarray, timestamp: np.ndarray,
                 j: np.ndarray | int) -> np.ndarray:
    h = np.full(len(user), _mix(seed % P, 0x5EED), dtype=np.int64)
    for value in (user, item, timestamp, j):
        h = _mix_np(h, np.asarray(value, dtype=np.int64))
    return _mix_np(h, np.int64(0x9E37))


# --- SQL (integer columns; one SELECT level per step, so no expression is repeated) ---


def positive_hash_sql(seed: int, source: str, keep: str, user: str = "user_id", item: str = "item_id",
                      timestamp: str = "timestamp") -> str:
    """``source``'s rows with ``keep`` (a select list) and ``plexrec_h``: the hash state after the
    seed, user, item and timestamp (``draw_hash_sql`` finishes it with the draw's j)."""
    sql = f"SELECT {keep}, CAST({_mix(seed % P, 0x5EED)} AS BIGINT) AS plexrec_h, {_mod(user)} AS v1, " \
          f"{_mod(item)} AS v2, {_mod(timestamp)} AS v3 FROM ({source}) AS s0"
    for step, value in enumerate(("v1", "v2", "v3")):
        sql = _mix_sql(sql, value, f"s{step + 1}")
    return sql


def draw_hash_sql(source: str, j: str) -> str:
    """``source`` (with ``plexrec_h`` from positive_hash_sql and a column ``j``) with ``plexrec_h``
    finished: draw_hash of the row's positive and j."""
    sql = _mix_sql(f"SELECT *, {_mod(j)} AS vj FROM ({source}) AS d0", "vj", "d1")
    return _mix_sql(f"SELECT *, CAST({0x9E37} AS BIGINT) AS vc FROM ({sql}) AS d2", "vc", "d3")


def draw_rank_sql(h: str, entries: str) -> str:
    """h * entries // P without an engine's integer division: the quotient of an exact multiple
    of P, rounded (it is below 2^31, far inside a double's precision)."""
    product = f"(CAST({h} AS BIGINT) * CAST({entries} AS BIGINT))"
    return f"CAST(ROUND(({product} - {product} % {P}) / {P}.0) AS BIGINT)"


def _mod(column: str) -> str:
    return f"((CAST({column} AS BIGINT) % {P}) + {P}) % {P}"


def _mix_sql(source: str, value: str, alias: str) -> str:
    """``source`` with plexrec_h mixed with column ``value`` (both in [0, P)), in two levels."""
    summed = f"SELECT *, (plexrec_h + {value}) % {P} AS plexrec_x FROM ({source}) AS {alias}a"
    return (f"SELECT * EXCLUDE (plexrec_h, plexrec_x, {value}), "
            f"(plexrec_x * plexrec_x % {P} * {MULTIPLIER} + {INCREMENT}) % {P} AS plexrec_h "
            f"FROM ({summed}) AS {alias}b")


# --- the direct loader's sampler (numpy) ---


@dataclass
class Draws:
    """The negatives of some positives: for each, its positive (an index into the arrays given),
    its k and its item; and how many (positive, k) were dropped after every round was rejected."""

    positive: np.ndarray
    k: np.ndarray
    item: np.ndarray
    dropped: int


def catalogue(behaviour_user: np.ndarray, behaviour_item: np.ndarray, behaviour_time: np.ndarray,
              sampler: str) -> tuple[np.ndarray, np.ndarray]:
    """(item, instant) of every catalogue entry in rank order (see the module's doc)."""
    if sampler == "popularity":
        order = np.lexsort((behaviour_item, behaviour_user, behaviour_time))
        return behaviour_item[order], behaviour_time[order]
    order = np.lexsort((behaviour_time, behaviour_item))
    items, starts = np.unique(behaviour_item[order], return_index=True)
    first_seen = behaviour_time[order][starts]
    order = np.lexsort((items, first_seen))
    return items[order], first_seen[order]


def sample_negatives(rule: ImplicitRule, user: np.ndarray, item: np.ndarray, timestamp: np.ndarray,
                     catalogue_items: np.ndarray, catalogue_times: np.ndarray,
                     row_user: np.ndarray, row_item: np.ndarray, row_time: np.ndarray) -> Draws:
    """Negatives of the positives (user, item, timestamp); ``row_*``: every interaction row (what
    a user has interacted with, and when). Vectorised: one pass of the positives per round."""
    entries = np.searchsorted(catalogue_times, timestamp, side="right")  # catalogue entries at or before t
    # the first time each user met each item: (user, item) as one sortable key over dense codes
    users, items = np.unique(row_user), np.unique(row_item)
    n_items = np.int64(len(items))
    row_key = np.searchsorted(users, row_user) * n_items + np.searchsorted(items, row_item)
    order = np.lexsort((row_time, row_key))
    keys, starts = np.unique(row_key[order], return_index=True)
    first_time = row_time[order][starts]

    def first_met(user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """The first instant each user met each item; int64 max where never (or unknown)."""
        u, i = np.searchsorted(users, user_ids), np.searchsorted(items, item_ids)
        known = (u < len(users)) & (i < n_items)
        known[known] = (users[u[known]] == user_ids[known]) & (items[i[known]] == item_ids[known])
        key = np.where(known, u * n_items + i, -1)
        at = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
        out = np.full(len(user_ids), np.iinfo(np.int64).max, dtype=np.int64)
        hit = known & (keys[at] == key)
        out[hit] = first_time[at[hit]]
        return out

    n, per = len(user), rule.negatives
    positive = np.repeat(np.arange(n), per)
    k = np.tile(np.arange(per), n)
    pending = entries[positive] > 0
    chosen = np.full(len(positive), -1, dtype=np.int64)
    for round_ in range(rule.rounds):
        index = np.flatnonzero(pending)
        if not len(index):
            break
        p = positive[index]
        h = draw_hash_np(rule.seed, user[p], item[p], timestamp[p], k[index] + round_ * per)
        candidate = catalogue_items[h * entries[p] // P]
        accepted = first_met(user[p], candidate) > timestamp[p]
        chosen[index[accepted]] = candidate[accepted]
        pending[index[accepted]] = False
    # an item id may be negative (string ids): kept by the pending flag, not by its sign
    kept = ~pending & (entries[positive] > 0)
    return Draws(positive=positive[kept], k=k[kept], item=chosen[kept], dropped=int((~kept).sum()))


# --- the store's sampler (SQL over the registered views of features/example_sql.py) ---


def negatives_query(schema, examples_from: str, columns: list[str]) -> str:
    """The sampled negatives of the positives among ``examples_from`` as example rows: ``columns``
    (the interaction columns, quoted) of the positive with the drawn item and no label, its
    ``ordinal``, and ``sample`` = k + 1. Reads the ``rows`` view (every loaded and streamed row:
    the catalogue of behaviours, and what each user had met and when)."""
    rule = ImplicitRule.of(schema.implicit)
    label_column = quote(schema.rating or schema.label)
    if rule.sampler == "popularity":
        entries = "SELECT item_id, user_id, timestamp AS plexrec_at FROM rows WHERE is_behaviour = 1"
    else:
        entries = ("SELECT item_id, CAST(0 AS BIGINT) AS user_id, MIN(timestamp) AS plexrec_at FROM rows "
                   "WHERE is_behaviour = 1 GROUP BY item_id")
    draws = ", ".join(f"({k}, {r})" for k in range(rule.negatives) for r in range(rule.rounds))
    hashed = positive_hash_sql(rule.seed, "SELECT * FROM counted WHERE entries > 0", "ordinal, user_id, "
                               "item_id, timestamp, entries")
    drawn = draw_hash_sql(f"SELECT h.*, d.k, d.plexrec_round, d.k + d.plexrec_round * {rule.negatives} AS j FROM ({hashed}) AS h "
                          f"CROSS JOIN (VALUES {draws}) AS d(k, plexrec_round)", "j")
    picked = [f"p.{c}" if c not in ('"item_id"', label_column) else
              ("n.item_id AS item_id" if c == '"item_id"' else f"NULL AS {label_column}") for c in columns]
    return f"""
    WITH pos AS (SELECT * FROM ({examples_from}) AS e WHERE {label_expression(schema)}),
    catalogue AS (SELECT item_id, plexrec_at, ROW_NUMBER() OVER (ORDER BY plexrec_at, user_id, item_id) - 1 AS plexrec_rank
                  FROM ({entries}) AS c),
    tally AS (
        SELECT ordinal, is_pos, SUM(weight) OVER (ORDER BY plexrec_at RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
               AS entries
        FROM (SELECT plexrec_at, 1 AS weight, 0 AS is_pos, CAST(NULL AS BIGINT) AS ordinal FROM catalogue
              UNION ALL SELECT timestamp, 0, 1, ordinal FROM pos) AS t),
    counted AS (SELECT p.ordinal, p.user_id, p.item_id, p.timestamp, CAST(t.entries AS BIGINT) AS entries
                FROM pos AS p JOIN (SELECT * FROM tally WHERE is_pos = 1) AS t ON t.ordinal = p.ordinal),
    candidates AS (
        SELECT d.ordinal, d.user_id, d.timestamp, d.k, d.plexrec_round, c.item_id AS drawn
        FROM ({drawn}) AS d JOIN catalogue AS c ON c.plexrec_rank = {draw_rank_sql("d.plexrec_h", "d.entries")}),
    met AS (
        SELECT user_id, item_id, MIN(timestamp) AS first_met FROM (
            SELECT user_id, item_id, timestamp FROM rows WHERE user_id IN (SELECT user_id FROM pos)
            UNION ALL SELECT user_id, item_id, timestamp FROM ({examples_from}) AS x) AS m
        GROUP BY user_id, item_id),
    accepted AS (
        SELECT ordinal, k, drawn, ROW_NUMBER() OVER (PARTITION BY ordinal, k ORDER BY plexrec_round) AS plexrec_first
        FROM candidates AS c LEFT JOIN met AS m ON m.user_id = c.user_id AND m.item_id = c.drawn
        WHERE m.first_met IS NULL OR m.first_met > c.timestamp)
    SELECT {", ".join(picked)}, p.ordinal, CAST(n.k + 1 AS BIGINT) AS sample
    FROM (SELECT ordinal, k, drawn AS item_id FROM accepted WHERE plexrec_first = 1) AS n
    JOIN pos AS p ON p.ordinal = n.ordinal
    """
