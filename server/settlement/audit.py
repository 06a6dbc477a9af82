"""`giftstream audit`: conservation of coins across Redis and the SQL ledger.

Safe beside a running server. Per partition it snapshots the totals and the outbox's
last id atomically, then reads the outbox up to that id, then SQL up to the snapshot's
sequence number. A movement missing from the outbox read was deleted after its commit,
so it is in SQL; the union of both, keyed by sequence number, must hold every movement
Redis ever acknowledged, exactly once.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from server.keys import quarantine_key, user_from_wallet_key, wallet_pattern
from server.movement import KEYED, Kind, Movement
from server.payments.audit import audit_payments
from server.settlement.outbox import quarantined, snapshot
from server.store.base import Store

# Offenders named one by one in a failure; the count covers all of them.
NAMED = 5


def _i(value: Any) -> int:
    return int(value) if value is not None else 0


async def _partition(redis: Redis, store: Store, p: int) -> tuple[dict[str, int], list[str]]:
    failures: list[str] = []
    totals, entries = await snapshot(redis, p)
    held = {m.seq: m for m in await quarantined(redis, p)}
    seq_max, credited, spent = _i(totals.get("seq")), _i(totals.get("credited")), _i(totals.get("spent"))
    pending: dict[int, Movement] = {m.seq: m for m in entries} | held
    sql = await store.partition_totals(p, seq_max)
    by_kind = await store.partition_kind_totals(p, seq_max)
    already = await store.settled_seqs(p, sorted(pending))
    unsettled = {s: m for s, m in pending.items() if s not in already}
    set_aside = [s for s in held if s not in already]
    if set_aside:
        failures.append(f"partition {p}: {len(set_aside)} movements set aside after a permanent settlement error "
                        f"(stream {quarantine_key(p)}, with the error); fix the cause, then `giftstream settle "
                        f"--requeue`")
    count = sql.count + len(unsettled)
    c_sum = sql.credited + sum(m.coins for m in unsettled.values() if m.kind is Kind.CREDIT)
    s_sum = sql.spent + sum(m.coins for m in unsettled.values() if m.kind is Kind.GIFT)
    if count != seq_max:
        failures.append(f"partition {p}: {seq_max} movements acknowledged, {count} settled or in the outbox")
    if c_sum != credited:
        failures.append(f"partition {p}: {credited} coins credited in Redis, ledger+outbox hold {c_sum}")
    if s_sum != spent:
        failures.append(f"partition {p}: {spent} coins spent in Redis, ledger+outbox hold {s_sum}")
    for kind in sorted(KEYED):
        coins, points = by_kind.get(kind.value, (0, 0))
        coins += sum(m.coins for m in unsettled.values() if m.kind is kind)
        points += sum(m.points for m in unsettled.values() if m.kind is kind)
        made = (_i(totals.get("c:" + kind.code)), _i(totals.get("q:" + kind.code)))
        if made != (coins, points):
            failures.append(f"partition {p}: {kind} movements changed coins and points by {made} in Redis, "
                            f"ledger+outbox hold {(coins, points)}")
    return {"partition": p, "movements": seq_max, "settled": sql.count, "unsettled": len(unsettled),
            "credited": credited, "spent": spent}, failures


# The wallet hash's running sums (movement.COUNTERS), in the order of the audit's formula.
_WALLET_FIELDS = ["coins", "credited", "rewarded", "adjusted", "spent", "clawed", "reversed", "points",
                  "points_earned", "points_redeemed"]


async def _wallets(redis: Redis, partitions: int) -> tuple[dict[str, int], list[str]]:
    """Per wallet: coins = credited + rewarded + adjusted - spent - clawed + reversed, and
    points = points earned - points redeemed."""
    failures: list[str] = []
    users = balances = credited = spent = points_total = 0
    for p in range(partitions):
        async for key in redis.scan_iter(match=wallet_pattern(p), count=1000):
            coins, cred, rew, adj, sp, clawed, rev, points, earned, redeemed = (
                _i(v) for v in await redis.hmget(key, _WALLET_FIELDS))
            users += 1
            balances += coins
            credited += cred
            spent += sp
            points_total += points
            if coins != cred + rew + adj - sp - clawed + rev:
                failures.append(f"wallet {user_from_wallet_key(key)}: {coins} coins but {cred} credited + {rew} "
                                f"rewarded + {adj} adjusted - {sp} spent - {clawed} clawed back + {rev} reversed")
            if points != earned - redeemed:
                failures.append(f"wallet {user_from_wallet_key(key)}: {points} points but {earned} earned - "
                                f"{redeemed} redeemed")
    return {"wallets": users, "wallet_balances": balances, "wallet_credited": credited,
            "wallet_spent": spent, "wallet_points": points_total}, failures


async def _hosts(store: Store) -> tuple[dict[str, Any], list[str]]:
    """Per host, lifetime = available + held + reserved + paid: available is what is left, so each
    other part is checked against its source. Lifetime = the host's settled gifts' units; held =
    its unreleased holds = its held ledger account; reserved and paid = its pending and paid
    withdrawals, reserved = its reserved ledger account; its available ledger account = lifetime -
    held - reserved - paid; none negative."""
    figures = await store.host_figures(NAMED)
    failures = []
    if figures["mismatched"]:
        named = "; ".join(
            f"{h['host_id']}: lifetime {h['lifetime_units']} (gifts {h['gift_units']}), held {h['held_units']} "
            f"(holds {h['hold_units']}, ledger {h['ledger_held_units']}), reserved {h['reserved_units']} "
            f"(pending withdrawals {h['pending_withdrawal_units']}, ledger {h['ledger_reserved_units']}), "
            f"paid {h['paid_units']} (paid withdrawals {h['paid_withdrawal_units']}), "
            f"available in the ledger {h['ledger_available_units']}" for h in figures["first"])
        more = figures["mismatched"] - len(figures["first"])
        failures.append(f"host diamonds (units) differ from their sources for {figures['mismatched']} host(s): "
                        f"{named}{f' and {more} more' if more else ''}")
    return figures, failures


async def run_audit(redis: Redis, store: Store, partitions: int) -> dict[str, Any]:
    """Every figure compared, and `ok` with the `failures` that broke it."""
    failures: list[str] = []
    parts = []
    for p in range(partitions):
        fig, fail = await _partition(redis, store, p)
        parts.append(fig)
        failures += fail
    wallets, fail = await _wallets(redis, partitions)
    failures += fail
    diamonds = await store.diamond_figures()
    if not diamonds["gift_diamond_units"] == diamonds["host_diamond_units"] == diamonds["ledger_host_diamond_units"]:
        failures.append("host diamonds differ from the sum of host shares of settled gifts: "
                        f"{diamonds['gift_diamond_units']} from gifts, {diamonds['host_diamond_units']} "
                        f"credited, {diamonds['ledger_host_diamond_units']} in the ledger")
    if diamonds["gifts"] != diamonds["host_gifts_received"]:
        failures.append(f"{diamonds['gifts']} gifts settled but hosts received {diamonds['host_gifts_received']}")
    if diamonds["unbalanced_units"]:
        failures.append("ledger entries do not sum to zero")
    unbalanced, offenders = await store.unbalanced_movements(NAMED)
    if unbalanced:
        named = ", ".join(f"movement {p}-{seq} ({unit} {total:+d})" for p, seq, unit, total in offenders)
        more = f" and {unbalanced - len(offenders)} more" if unbalanced > len(offenders) else ""
        failures.append(f"ledger entries do not sum to zero per movement and unit in {unbalanced} case(s): "
                        f"{named}{more}")
    hosts, fail = await _hosts(store)
    failures += fail
    payments, fail = await audit_payments(redis, store, partitions)
    failures += fail
    totals = {
        "movements": sum(p["movements"] for p in parts),
        "unsettled": sum(p["unsettled"] for p in parts),
        "coins_credited": sum(p["credited"] for p in parts),
        "coins_spent": sum(p["spent"] for p in parts),
    }
    return {"ok": not failures, "failures": failures, "totals": totals, "wallets": wallets,
            "diamonds": diamonds, "hosts": hosts, "unbalanced_movements": unbalanced, "payments": payments,
            "partitions": parts}
