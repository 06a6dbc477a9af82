"""The payments part of `giftstream audit`: webhook events applied at most once, and credited
orders matching credit movements.

- Every webhook event is applied at most once: the events table is keyed by event id, every
  event recorded as applied made transitions, every transition an event made names an event
  recorded as applied (to that order), and no order's claw-back or reversal settled twice.
- Every paid order (credited, or refunded, disputed ... since) has its credit in Redis
  (credit.lua's orders hash: order id -> movement number; the partition audit proves that
  movement is in the ledger or the outbox), no settled credit names an order that was not paid,
  and each order's settled credit is one movement of exactly its coins. An order whose credit is
  still to make (a crash between the SQL commit and Redis; the payments sweep makes it) is
  counted, not failed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from redis.asyncio import Redis

from server.keys import UserKeys
from server.store.base import Store

# Offenders named one by one in a failure.
NAMED = 5
_CHUNK = 1000


async def audit_payments(redis: Redis, store: Store, partitions: int) -> tuple[dict[str, Any], list[str]]:
    fig = await store.payment_figures(NAMED)
    failures: list[str] = []
    if fig["transitions_without_event"]:
        failures.append(f"{fig['transitions_without_event']} order transitions name a webhook event not recorded as "
                        "applied to their order")
    for kind, ref, n in fig["clawbacks_twice"]:
        failures.append(f"order {ref}: {n} {kind} movements settled, at most one may be")
    for order_id, status in fig["credits_of_unpaid_orders"]:
        failures.append(f"order {order_id} is {status} but a credit of it is settled")
    for order_id, n, coins, expected in fig["credits_not_matching"]:
        failures.append(f"order {order_id}: {n} credit movements of {coins} coins settled, expected one of {expected}")
    by_key: dict[str, list[str]] = defaultdict(list)
    for order_id, user_id, _coins in fig["paid_orders"]:
        by_key[UserKeys(user_id, partitions).orders].append(order_id)
    missing: list[str] = []
    for key, ids in by_key.items():
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            seqs = await redis.hmget(key, chunk)
            missing += [order_id for order_id, seq in zip(chunk, seqs, strict=True) if seq is None]
    if missing:
        named = ", ".join(missing[:NAMED]) + (f" and {len(missing) - NAMED} more" if len(missing) > NAMED else "")
        failures.append(f"{len(missing)} paid orders have no credit in Redis: {named}")
    figures = {"events": fig["events"], "events_applied": fig["events_applied"],
               "paid_orders": len(fig["paid_orders"]), "paid_orders_without_credit": len(missing)}
    return figures, failures
