"""Host-side diamond movements made in SQL, and their ledger rows.

The ledger is keyed (part, seq, leg). Movements from the outbox own part >= 0 (a user partition,
numbered by its Lua script). A withdrawal's diamonds move in SQL alone, with no partition: such a
movement takes part HOST_PART (-1, "host side, made in SQL") and the next seq of the counter row
ledger_sequences(part = -1), drawn in the transaction that makes the movement. So each one has a
key of its own, and the audit's per-movement zero-sum check (queries.UNBALANCED_MOVEMENTS) holds
for these as for any other.

The counter row is one lock that every such movement takes (on PostgreSQL, until its commit):
take it last, after the host_earnings row, so two transactions never wait on each other in a
cycle. Withdrawals are rare; the one row costs nothing at their rate.

Their unit is the gifts' own, DIAMOND_UNIT (1/10,000 of a diamond; a withdrawal's whole diamonds
times UNITS_PER_DIAMOND), so one host's accounts read in one unit: `host:<id>` is what the host
may withdraw, `host_held:<id>` what holds keep, `host_reserved:<id>` what pending withdrawals
keep, and `platform:payouts` what was paid out. `giftstream audit` compares each with
host_earnings.
"""

from __future__ import annotations

from server.store.models import DIAMOND_UNIT, HOST_ACCOUNT_PREFIX, UNITS_PER_DIAMOND

HOST_PART = -1
# A host's diamonds of pending withdrawals, and the diamonds paid out to hosts.
HOST_RESERVED_PREFIX = "host_reserved:"
PAYOUTS_ACCOUNT = "platform:payouts"

NEXT_SEQ = "UPDATE ledger_sequences SET seq = seq + 1 WHERE part = -1 RETURNING seq"

Leg = tuple[int, int, int, str, str, int]


def host(host_id: str) -> str:
    return HOST_ACCOUNT_PREFIX + host_id


def reserved(host_id: str) -> str:
    return HOST_RESERVED_PREFIX + host_id


def legs(seq: int, source: str, target: str, diamonds: int) -> list[Leg]:
    """`diamonds` (whole) from `source` to `target`: two legs of movement (-1, seq) that sum to zero."""
    units = diamonds * UNITS_PER_DIAMOND
    return [(HOST_PART, seq, 0, source, DIAMOND_UNIT, -units), (HOST_PART, seq, 1, target, DIAMOND_UNIT, units)]
