"""After a storm: did every member get every acked gift of its room exactly once, and how late?

Delivery latency is the member's receive time minus the moment the gift's sender received its
ack (both clocks of this machine, keyed by gift_id); `e2e` is receive time minus the moment
the gift was first sent. Members with identical frame sequences are checked once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

from loadtests.stats import Hist
from loadtests.stats import np as np  # None without numpy

if TYPE_CHECKING:
    from loadtests.members import Member
    from loadtests.worker import Worker

WAIT_S = 30.0
QUIET_S = 5.0

Expected = dict[str, dict[str, tuple[float, float]]]


async def wait_for_all(members: list[Member], expected: Expected) -> None:
    """Until each member holds as many gift events as its room had acks, or nothing moves for QUIET_S."""
    target = {room: len(ids) for room, ids in expected.items()}
    deadline = time.time() + WAIT_S
    last_total, last_move = -1, time.time()
    while time.time() < deadline:
        if all(m.n_gifts >= target.get(m.room, 0) for m in members):
            return
        total = sum(m.n_gifts for m in members)
        if total != last_total:
            last_total, last_move = total, time.time()
        elif time.time() - last_move > QUIET_S:
            return
        await asyncio.sleep(0.2)


def check_counts(members: list[Member], expected: Expected) -> dict[str, Any]:
    groups: dict[tuple[str, bytes, tuple[Any, ...]], list[Member]] = defaultdict(list)
    for m in members:
        groups[(m.room, m.frames.tobytes(), tuple(ids for ids, _ in m.extra))].append(m)
    out: dict[str, Any] = {"members_checked": len(members), "members_missing": 0, "members_duplicated": 0,
           "missing_events": 0, "duplicate_events": 0, "unacked_events": 0, "distinct_sequences": len(groups)}
    examples: list[str] = []
    for (room, _, _), ms in groups.items():
        got = ms[0].received()
        want = expected.get(room, {})
        missing = [g for g in want if g not in got]
        dups = sum(c - 1 for c in got.values() if c > 1)
        out["unacked_events"] += len([g for g in got if g not in want]) * len(ms)
        if missing:
            out["members_missing"] += len(ms)
            out["missing_events"] += len(missing) * len(ms)
            examples.append(f"{len(ms)} member(s) of room {room} missed {len(missing)} gift(s), e.g. {missing[:3]}")
        if dups:
            out["members_duplicated"] += len(ms)
            out["duplicate_events"] += dups * len(ms)
            examples.append(f"{len(ms)} member(s) of room {room} got {dups} duplicate gift event(s)")
    out["examples"] = examples[:20]
    return out


def latency(members: list[Member], table_gifts: list[tuple[str, ...]], expected: Expected,
            t0: float) -> dict[str, Any]:
    """Delivery histograms (vs ack, vs first send), overall and per second of the run."""
    times: dict[str, tuple[float, float]] = {}
    for room_times in expected.values():
        times.update(room_times)
    vs_ack, vs_send = Hist(), Hist()
    per_sec: dict[int, Hist] = defaultdict(Hist)
    count_per_sec: Counter[int] = Counter()
    if np is not None:
        _latency_np(members, table_gifts, times, t0, vs_ack, vs_send, per_sec, count_per_sec)
    else:
        for m in members:
            for idx, t in zip(m.frames, m.times, strict=True):
                _add_py(table_gifts[idx], t, times, t0, vs_ack, vs_send, per_sec, count_per_sec)
    for m in members:
        for ids, t in m.extra:
            _add_py(ids, t, times, t0, vs_ack, vs_send, per_sec, count_per_sec)
    return {"vs_ack": vs_ack.dump(), "vs_send": vs_send.dump(),
            "per_sec": {s: h.dump() for s, h in per_sec.items()}, "count_per_sec": dict(count_per_sec)}


def _add_py(ids: tuple[str, ...], t: float, times: dict[str, tuple[float, float]], t0: float,
            vs_ack: Hist, vs_send: Hist, per_sec: dict[int, Hist], count_per_sec: Counter[int]) -> None:
    sec = int(t - t0)
    count_per_sec[sec] += len(ids)
    for g in ids:
        st = times.get(g)
        if st is None:
            continue
        ms = (t - st[1]) * 1000
        vs_ack.add(ms)
        per_sec[sec].add(ms)
        vs_send.add((t - st[0]) * 1000)


def _latency_np(members: list[Member], table_gifts: list[tuple[str, ...]], times: dict[str, tuple[float, float]],
                t0: float, vs_ack: Hist, vs_send: Hist, per_sec: dict[int, Hist],
                count_per_sec: Counter[int]) -> None:
    frames = [np.frombuffer(m.frames.tobytes(), dtype=np.int32) for m in members if len(m.frames)]
    if not frames:
        return
    f = np.concatenate(frames)
    t = np.concatenate([np.frombuffer(m.times.tobytes(), dtype=np.float64) for m in members if len(m.frames)])
    order = np.argsort(f, kind="stable")
    f, t = f[order], t[order]
    idxs, starts = np.unique(f, return_index=True)
    ends = np.append(starts[1:], len(f))
    sizes = np.array([len(table_gifts[i]) for i in idxs])
    secs = (t - t0).astype(np.int64)
    counts = np.bincount(np.maximum(secs, 0), weights=np.repeat(sizes, ends - starts))
    for s in np.nonzero(counts)[0]:
        count_per_sec[int(s)] += int(counts[s])
    nan = float("nan")
    for i, a, b in zip(idxs, starts, ends, strict=True):
        st = [times.get(g, (nan, nan)) for g in table_gifts[i]]
        sends = np.array([x[0] for x in st])
        acks = np.array([x[1] for x in st])
        ok = ~np.isnan(acks)
        if not ok.any():
            continue
        tt = t[a:b]
        lat = ((tt[:, None] - acks[ok][None, :]) * 1000).ravel()
        vs_ack.add_many(lat)
        vs_send.add_many(((tt[:, None] - sends[ok][None, :]) * 1000).ravel())
        sec_rows = np.repeat(secs[a:b], int(ok.sum()))
        for s in np.unique(sec_rows):
            per_sec[int(s)].add_many(lat[sec_rows == s])


async def check_deliveries(worker: Worker, expected: Expected, t0: float) -> dict[str, Any]:
    active = [m for m in worker.members if not m.stall]
    await wait_for_all(active, expected)
    counts = check_counts(active, expected)
    lat = latency(active, worker.table.gifts, expected, t0)
    stalled = [{"member": m.mid, "gift_events": m.n_gifts, "close_codes": m.close_codes,
                "connected": m.connected} for m in worker.members if m.stall]
    return {
        "counts": counts, "latency": lat, "stalled": stalled,
        "frames_in": worker.frames_in, "distinct_frames": len(worker.table.gifts),
        "bytes_in": sum(m.proto.bytes_in for m in worker.members if m.proto is not None),
        "reconnects": sum(m.reconnects for m in worker.members),
        "close_codes": dict(Counter(str(c) for m in worker.members for c in m.close_codes)),
        "overlaps": sum(m.overlaps for m in active), "dropped_by_offset": sum(m.dropped_by_offset for m in active),
        "resume_failed": worker.resume_failed,
        "overlaps_without_resume": sum(m.overlaps for m in active if not m.resumed),
    }
