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

Their unit is DIAMOND, whole diamonds (a withdrawal is whole diamonds), beside the gifts'
'diamond_unit' rows (1/10,000 of a diamond): the figures the audit compares per unit stay as
they were.
"""

from __future__ import annotations

from server.store.models import HOST_ACCOUNT_PREFIX

HOST_PART = -1
DIAMOND = "diamond"
# A host's diamonds of pending withdrawals, and the diamonds paid out to hosts.
HOST_RESERVED_PREFIX = "host_reserved:"
PAYOUTS_ACCOUNT = "platform:payouts"

NEXT_SEQ = "UPDATE ledger_sequences SET seq = seq + 1 WHERE part = -1 RETURNING seq"
INSERT_LEG = "INSERT INTO ledger (part, seq, leg, account, unit, delta) VALUES (?,?,?,?,?,?)"

Leg = tuple[int, int, int, str, str, int]


def host(host_id: str) -> str:
    return HOST_ACCOUNT_PREFIX + host_id


def reserved(host_id: str) -> str:
    return HOST_RESERVED_PREFIX + host_id


def legs(seq: int, source: str, target: str, diamonds: int) -> list[Leg]:
    """`diamonds` from `source` to `target`: two legs of movement (-1, seq) that sum to zero."""
    return [(HOST_PART, seq, 0, source, DIAMOND, -diamonds), (HOST_PART, seq, 1, target, DIAMOND, diamonds)]
