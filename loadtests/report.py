"""The storm's report: figures from what the workers saw, and the verdict with its reasons."""

from __future__ import annotations

from collections import Counter
from typing import Any

from loadtests.stats import Hist, percentile

KEYS = ("acks_per_s", "ack_p99_ms", "deliveries_per_s", "delivery_p99_ms", "settle_lag_p99_ms",
        "rss_per_conn_kib", "verdict", "failures", "ceilings", "room")


def merge_gifts(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"sent": 0, "attempts": 0, "acked": 0, "replayed": 0, "duplicate_acks": 0,
                           "conflict_count": 0, "behind_max": 0}
    errors: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    conflicts: list[str] = []
    unacked: list[str] = []
    cols: dict[str, list[Any]] = {"cid": [], "gift_id": [], "room": [], "send_t": [], "ack_t": []}
    for r in results:
        for k in ("sent", "attempts", "acked", "replayed", "duplicate_acks", "conflict_count"):
            out[k] += r[k]
        out["behind_max"] = max(out["behind_max"], r["behind_max"])
        out["client_loop_lag_max_ms"] = max(out.get("client_loop_lag_max_ms", 0.0), r["loop_lag_max_ms"])
        out.setdefault("client_loop_lag_max_ms_by_worker", []).append(r["loop_lag_max_ms"])
        errors.update(r["errors"])
        refused.update(r["refused"])
        conflicts += r["conflicts"]
        unacked += r["unacked"]
        for k in cols:
            cols[k] += r["cols"][k]
    out.update(errors=dict(errors), refused=dict(refused), conflicts=conflicts[:100], unacked=len(unacked),
               unacked_examples=unacked[:10], cols=cols)
    return out


def ack_figures(cols: dict[str, list[Any]], t0: float, duration: float) -> dict[str, Any]:
    hist = Hist()
    per_sec: dict[int, Hist] = {}
    in_window = 0
    end = t0 + duration
    for s, a in zip(cols["send_t"], cols["ack_t"], strict=True):
        ms = (a - s) * 1000
        hist.add(ms)
        sec = int(a - t0)
        h = per_sec.get(sec)
        if h is None:
            h = per_sec[sec] = Hist()
        h.add(ms)
        if a <= end:
            in_window += 1
    series = [{"t": s, "acks": h.n, "p50_ms": h.percentile(50), "p99_ms": h.percentile(99)}
              for s, h in sorted(per_sec.items())]
    return {"hist": hist, "acks_in_window": in_window, "series": series}


def expected_by_room(cols: dict[str, list[Any]]) -> tuple[dict[str, dict[str, tuple[float, float]]], list[str]]:
    """room -> gift_id -> (first send, ack), and the gift ids acked for two different client ids."""
    exp: dict[str, dict[str, tuple[float, float]]] = {}
    owner: dict[str, str] = {}
    clashes: list[str] = []
    for cid, gid, room, s, a in zip(cols["cid"], cols["gift_id"], cols["room"], cols["send_t"], cols["ack_t"],
                                    strict=True):
        prev = owner.setdefault(gid, cid)
        if prev != cid:
            clashes.append(f"gift_id {gid} acked for client ids {prev} and {cid}")
        exp.setdefault(room, {})[gid] = (s, a)
    return exp, clashes


def merge_deliveries(results: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    examples: list[str] = []
    vs_ack, vs_send = Hist(), Hist()
    per_sec: dict[int, Hist] = {}
    count_per_sec: Counter[int] = Counter()
    stalled: list[dict[str, Any]] = []
    extra: Counter[str] = Counter()
    close_codes: Counter[str] = Counter()
    for r in results:
        c = {k: v for k, v in r["counts"].items() if k != "examples"}
        examples += r["counts"].get("examples", [])
        counts.update(c)
        lat = r["latency"]
        vs_ack.merge(Hist.load(lat["vs_ack"]))
        vs_send.merge(Hist.load(lat["vs_send"]))
        for s, raw in lat["per_sec"].items():
            per_sec.setdefault(int(s), Hist()).merge(Hist.load(raw))
        count_per_sec.update({int(s): n for s, n in lat["count_per_sec"].items()})
        stalled += r["stalled"]
        close_codes.update(r["close_codes"])
        for k in ("frames_in", "distinct_frames", "bytes_in", "reconnects", "overlaps", "dropped_by_offset",
                  "resume_failed", "overlaps_without_resume"):
            extra[k] += r[k]
    in_window = sum(n for s, n in count_per_sec.items() if 0 <= s < duration)
    series = [{"t": s, "deliveries": count_per_sec.get(s, 0),
               "p50_ms": per_sec[s].percentile(50) if s in per_sec else None,
               "p99_ms": per_sec[s].percentile(99) if s in per_sec else None}
              for s in sorted(set(count_per_sec) | set(per_sec))]
    return {"counts": dict(counts), "examples": examples[:20], "vs_ack": vs_ack, "vs_send": vs_send,
            "in_window": in_window, "series": series, "stalled": stalled, "close_codes": dict(close_codes),
            **dict(extra)}


def verdict(gifts: dict[str, Any], clashes: list[str], deliveries: dict[str, Any], audit: dict[str, Any],
            settlement: dict[str, Any], connect: dict[str, Any]) -> list[str]:
    failures: list[str] = []
    if connect["connected"] < connect["members"]:
        failures.append(f"{connect['members'] - connect['connected']} of {connect['members']} sockets "
                        f"failed to join: {connect['failures']}")
    if gifts["unacked"]:
        failures.append(f"{gifts['unacked']} gifts never acked (e.g. {gifts['unacked_examples'][:3]})")
    if gifts["conflict_count"]:
        failures.append(f"{gifts['conflict_count']} inconsistent acks: {gifts['conflicts'][:3]}")
    if clashes:
        failures.append(f"{len(clashes)} gift ids acked for different client ids: {clashes[:3]}")
    c = deliveries["counts"]
    if c.get("missing_events"):
        failures.append(f"{c['members_missing']} sockets missed {c['missing_events']} gift deliveries")
    if c.get("duplicate_events"):
        failures.append(f"{c['members_duplicated']} sockets got {c['duplicate_events']} duplicate gift events")
    if deliveries.get("overlaps_without_resume"):
        failures.append(f"{deliveries['overlaps_without_resume']} frames repeated or reordered offsets "
                        "on sockets that never resumed")
    if audit.get("ran") and not audit.get("ok"):
        failures.append(f"giftstream audit failed (exit {audit.get('exit')}): {audit.get('failures')}")
    if not settlement.get("drained"):
        failures.append(f"outbox not drained after the storm: {settlement.get('outbox_entries')} entries left")
    if settlement.get("checked"):
        for k, what in (("missing", "acked gifts not settled"), ("client_mismatch", "settled gifts whose "
                        "client id differs from the acked one"), ("double_charged", "(sender, client id) "
                        "pairs settled more than once")):
            if settlement.get(k):
                failures.append(f"{settlement[k]} {what}")
        if settlement.get("settled_unacked") and not gifts["unacked"]:
            failures.append(f"{settlement['settled_unacked']} settled gifts were never acked")
    return failures


def settle_check(settled: tuple[dict[str, tuple[str, str]], int] | None, cols: dict[str, list[Any]]) -> dict[str, Any]:
    if settled is None:
        return {"checked": False}
    rows, doubles = settled
    acked = dict(zip(cols["gift_id"], cols["cid"], strict=True))
    missing = sum(1 for g in acked if g not in rows)
    mismatch = sum(1 for g, cid in acked.items() if g in rows and rows[g][0] != cid)
    return {"checked": True, "settled_rows": len(rows), "missing": missing, "client_mismatch": mismatch,
            "double_charged": doubles, "settled_unacked": sum(1 for g in rows if g not in acked)}


def lag_p99(samples: list[dict[str, Any]]) -> float | None:
    return percentile([s["outbox_lag_ms"] for s in samples if s.get("outbox_lag_ms") is not None], 99)


def room_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The big room's figures side by side: the gifters' ack p99, the send-to-viewer p99 (from the
    moment a gifter wrote the gift frame to a viewer having it), their ratio, and that p99 against
    the bare coalescing loop's of the same run (when the ceilings were measured)."""
    d = report["deliveries"]
    to_viewer = (d.get("viewers_vs_send") or d["vs_send"])["p99_ms"]
    ack = report["ack_p99_ms"]
    ceilings = report.get("ceilings") or {}
    # Every event's latency, as the storm counts its deliveries (the oldest of each frame only,
    # the earlier editions' yardstick, is up to a tick later and kept beside it).
    bare = ceilings.get("broadcast_coalesced_event_p99_ms") or ceilings.get("broadcast_coalesced_p99_ms")
    tick = (ceilings.get("detail") or {}).get("tick_ms")

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    return {"ack_p99_ms": ack, "send_to_viewer_p99_ms": to_viewer,
            "send_to_viewer_of": "viewer workers" if d.get("viewers_vs_send") else "every socket",
            "ack_over_send_to_viewer": ratio(ack, to_viewer),
            "bare_coalescing_p99_ms": bare, "bare_tick_ms": tick,
            "bare_coalescing_oldest_p99_ms": ceilings.get("broadcast_coalesced_p99_ms"),
            "send_to_viewer_over_bare": ratio(to_viewer, bare),
            "deliveries_per_s": report["deliveries_per_s"]}
