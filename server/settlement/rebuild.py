"""Disaster recovery: recompute every Redis wallet from the SQL ledger plus the unsettled outbox.

A wallet's balances and running sums (coins, credited, spent, clawed, reversed, rewarded,
adjusted; points, points earned and redeemed) follow from its movements: the settled ones are in
SQL, the rest still in its partition's outbox (the same union `audit` checks). Other wallet
fields (budget, restriction, monthly spend, gift count), idempotency keys and the keyed
movements' done hashes are left alone.

Run it with gift traffic stopped. It is still safe if traffic is not: each partition is
written in one MULTI guarded by WATCH on the partition totals, which every movement bumps,
so a partition that moved after it was read is skipped and reported, never overwritten with
stale figures. The settler may keep running (see `_settled_stable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError

from server.cluster import node_client
from server.keys import UserKeys, totals_key, user_from_wallet_key, wallet_pattern
from server.movement import COUNTERS, KEYED, Kind, Movement
from server.settlement.outbox import quarantined, snapshot
from server.store.base import Store

FIELDS = ("coins", "credited", "spent", "clawed", "reversed", "rewarded", "adjusted", "points", "points_earned",
          "points_redeemed")
_COUNTERS = FIELDS[1:]
Sums = dict[str, int]  # a wallet's running sums, by wallet field (_COUNTERS)
PAGE = 5000
STABLE_ATTEMPTS = 20
# Changed wallets listed one by one in the report; the counts always cover all of them.
REPORT_CHANGES = 100


@dataclass
class _Partition:
    """What Redis held for one partition at one instant: its sequence number and outbox."""

    seq: int
    # seq -> movement, for every outbox entry up to the snapshot
    pending: dict[int, Movement] = field(default_factory=dict)
    wallet_users: set[str] = field(default_factory=set)


async def _snapshot(redis: Redis, p: int) -> _Partition:
    totals, entries = await snapshot(redis, p)
    entries += await quarantined(redis, p)  # charged in Redis, not in the ledger: as the outbox
    part = _Partition(seq=int(totals.get("seq") or 0))
    for m in entries:
        part.pending[m.seq] = m
    async for key in redis.scan_iter(match=wallet_pattern(p), count=1000):
        part.wallet_users.add(user_from_wallet_key(key))
    return part


async def _settled(store: Store, parts: dict[int, _Partition]) -> dict[int, set[int]]:
    return {p: await store.settled_seqs(p, sorted(part.pending)) for p, part in parts.items()}


async def _settled_stable(store: Store, parts: dict[int, _Partition]
                          ) -> tuple[dict[str, Sums], dict[int, set[int]]]:
    """SQL wallet totals and which outbox entries they include, from a consistent view.

    The two reads are separate queries. An entry the settler commits between them would be
    counted twice or not at all, so read "settled" on both sides of the totals and accept only
    when nothing moved; the entries are a fixed set, so a running settler soon finishes them.
    """
    before = await _settled(store, parts)
    for _ in range(STABLE_ATTEMPTS):
        totals = _sums(await store.wallet_totals(), await store.wallet_kind_totals())
        after = await _settled(store, parts)
        if after == before:
            return totals, after
        before = after
    raise RuntimeError("the outbox kept being settled during the rebuild; stop the settler and retry")


def _add(sums: Sums, kind: Kind, coins: int, points: int) -> None:
    """Add one movement's (or one kind's summed) changes to a wallet's running sums."""
    if kind is Kind.CREDIT:
        sums["credited"] += coins
    elif kind is Kind.GIFT:
        sums["spent"] += coins
    elif kind in KEYED:
        coin_field, coin_sign, points_field, points_sign = COUNTERS[kind]
        if coin_field:
            sums[coin_field] += coin_sign * coins
        if points_field:
            sums[points_field] += points_sign * points


def _zero() -> Sums:
    return dict.fromkeys(_COUNTERS, 0)


def _sums(totals: dict[str, tuple[int, int]], keyed: dict[str, dict[str, tuple[int, int]]]) -> dict[str, Sums]:
    """user -> running sums of their settled movements."""
    out: dict[str, Sums] = {}
    for user, (credited, spent) in totals.items():
        sums = out.setdefault(user, _zero())
        sums["credited"] += credited
        sums["spent"] += spent
    for user, kinds in keyed.items():
        sums = out.setdefault(user, _zero())
        for kind, (coins, points) in kinds.items():
            _add(sums, Kind(kind), coins, points)
    return out


def _expected(parts: dict[int, _Partition], totals: dict[str, Sums], settled: dict[int, set[int]],
              partitions: int) -> dict[int, dict[str, Sums]]:
    """partition -> user -> the running sums its wallet must show."""
    # A wallet with no movement at all (say, only a budget set) must show zero coins.
    out: dict[int, dict[str, Sums]] = {p: {u: _zero() for u in part.wallet_users} for p, part in parts.items()}
    for user, sums in totals.items():
        mine = out[UserKeys(user, partitions).partition].setdefault(user, _zero())
        for name, value in sums.items():
            mine[name] += value
    for p, part in parts.items():
        for seq, m in part.pending.items():
            if seq not in settled[p]:
                _add(out[p].setdefault(m.user_id, _zero()), m.kind, m.coins, m.points)
    return out


def _after(sums: Sums) -> tuple[int, ...]:
    """A wallet's FIELDS from its running sums: the audit's formula."""
    coins = (sums["credited"] + sums["rewarded"] + sums["adjusted"] - sums["spent"] - sums["clawed"]
             + sums["reversed"])
    return (coins, *(sums[f] for f in FIELDS[1:7]), sums["points_earned"] - sums["points_redeemed"],
            sums["points_earned"], sums["points_redeemed"])


def _as_int(value: Any) -> int | None:
    return int(value) if value is not None else None


async def _current(redis: Redis, partitions: int, users: list[str]) -> list[tuple[int | None, ...]]:
    """Each wallet's FIELDS. A missing coins, credited or spent is None (written as 0), a missing
    sum of the coin economy 0 (a wallet that never had that kind of movement needs no field)."""
    pipe = redis.pipeline(transaction=False)
    for user in users:
        pipe.hmget(UserKeys(user, partitions).wallet, list(FIELDS))
    return [tuple(_as_int(v) if i < 3 else _as_int(v) or 0 for i, v in enumerate(row))
            for row in await pipe.execute()]


async def _write_partition(redis: Redis, p: int, seq: int, writes: dict[str, dict[str, int]]) -> bool:
    """Write the wallets unless the partition moved since its snapshot; False when it did."""
    async with node_client(redis, totals_key(p)) as node, node.pipeline(transaction=True) as pipe:
        try:
            await pipe.watch(totals_key(p))
            if int(await pipe.hget(totals_key(p), "seq") or 0) != seq:
                return False
            pipe.multi()  # type: ignore[no-untyped-call]
            for key, mapping in writes.items():
                pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
            await pipe.execute()
        except WatchError:
            return False
    return True


async def _rebuild_partition(redis: Redis, p: int, part: _Partition, expected: dict[str, Sums],
                             partitions: int, dry_run: bool, report: dict[str, Any]) -> None:
    users = sorted(expected)
    current = await _current(redis, partitions, users)
    writes: dict[str, dict[str, int]] = {}
    for user, before in zip(users, current, strict=True):
        after = _after(expected[user])
        report["coins"] += after[0]
        report["credited"] += expected[user]["credited"]
        report["spent"] += expected[user]["spent"]
        report["points"] += after[7]
        if before == after:
            continue
        writes[UserKeys(user, partitions).wallet] = dict(zip(FIELDS, after, strict=True))
        if len(report["changes"]) < REPORT_CHANGES:
            report["changes"].append({"user": user, "before": dict(zip(FIELDS, before, strict=True)),
                                      "after": dict(zip(FIELDS, after, strict=True))})
    report["users"] += len(users)
    if dry_run or not writes:
        report["changed"] += len(writes)
        return
    if await _write_partition(redis, p, part.seq, writes):
        report["changed"] += len(writes)
    else:
        report["skipped_partitions"].append(p)


async def _totals_behind(redis: Redis, store: Store, p: int, part: _Partition, settled_seqs: set[int],
                         dry_run: bool) -> dict[str, Any] | None:
    """A partition whose Redis sequence is below what SQL settled (Redis lost its totals) would
    reuse settled numbers, and the settler would drop the new movements as duplicates. Its totals
    are restored from the ledger and the unsettled outbox (unless it moved meanwhile, or on a dry
    run); movements made before that under reused numbers cannot be told apart, so this is
    reported loudly either way."""
    settled = await store.partition_totals(p, 2**62)
    if settled.count <= part.seq:
        return None
    unsettled = [m for seq, m in part.pending.items() if seq not in settled_seqs]
    restored = {"seq": max([settled.count, *part.pending]),
                "credited": settled.credited + sum(m.coins for m in unsettled if m.kind is Kind.CREDIT),
                "spent": settled.spent + sum(m.coins for m in unsettled if m.kind is Kind.GIFT)}
    by_kind = await store.partition_kind_totals(p, 2**62)
    for kind in sorted(KEYED):  # each kind's sums, where it moved anything (move.lua writes no zero)
        coins, points = by_kind.get(kind.value, (0, 0))
        coins += sum(m.coins for m in unsettled if m.kind is kind)
        points += sum(m.points for m in unsettled if m.kind is kind)
        if coins:
            restored["c:" + kind.code] = coins
        if points:
            restored["q:" + kind.code] = points
    done = not dry_run and await _write_partition(redis, p, part.seq, {totals_key(p): restored})
    return {"partition": p, "redis_seq": part.seq, "settled_movements": settled.count,
            "restored": restored if done else None}


async def rebuild_wallets(redis: Redis, store: Store, partitions: int, *,
                          dry_run: bool = False) -> dict[str, Any]:
    """Set every wallet's coins/credited/spent to what the ledger and the outbox say.

    Returns the figures: users examined, wallets changed (or that would change, on a dry
    run), the rebuilt sums, up to REPORT_CHANGES before/after pairs, and any partition that
    moved during the rebuild (`skipped_partitions`, not written: run again) or whose Redis
    sequence number is behind SQL (`totals_behind`). `ok` is False when either list is non-empty.
    """
    parts = {p: await _snapshot(redis, p) for p in range(partitions)}
    totals, settled = await _settled_stable(store, parts)
    expected = _expected(parts, totals, settled, partitions)
    report: dict[str, Any] = {
        "dry_run": dry_run, "users": 0, "changed": 0, "coins": 0, "credited": 0, "spent": 0, "points": 0,
        "unsettled_movements": sum(len(part.pending) - len(settled[p]) for p, part in parts.items()),
        "skipped_partitions": [], "totals_behind": [], "changes": [],
    }
    for p, part in parts.items():
        await _rebuild_partition(redis, p, part, expected.get(p, {}), partitions, dry_run, report)
        behind = await _totals_behind(redis, store, p, part, settled[p], dry_run)
        if behind is not None:
            report["totals_behind"].append(behind)
    report["ok"] = not report["skipped_partitions"] and not report["totals_behind"]
    return report
