"""Gift storm: rooms full of viewers, gifters at a fixed rate, then proof that nothing was lost.

    python -m loadtests.storm --rooms 2 --viewers-per-room 20 --gifters 4 --rate 200 --duration 5

A gifter's ack beside a big room's fan-out (docs/benchmarks.md), with the bare coalescing loop
of the same machine measured right after it; the figures are in the report's "room" block:

    python -m loadtests.storm --rooms 1 --viewers-per-room 5000 --gifters 64 --rate 1000 \
        --duration 20 --gifters-apart --ceilings --ceiling-parts coalesced --ceiling-tick-ms 50

Without --target it starts its own `giftstream serve` (embedded valkey, SQLite) on a temp data
dir. It creates rooms, recharges gifters, connects every socket (split over --processes
workers), drives the gift rate open-loop with unique idempotency ids (retrying refused or
unacked ids with the same id), then waits for settlement, runs `giftstream audit`, checks
the SQL ledger and every socket's events by gift_id, and writes a JSON report. Exit 1 when
the verdict is "fail".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from loadtests import report as rep
from loadtests.target import Target, cpu_seconds, raise_fd_limit, rss_kib
from loadtests.worker import worker_main
from server import auth

COIN_CAP = 2_500_000  # the catalog's largest custom recharge


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.storm", description=__doc__.split("\n")[0])
    p.add_argument("--target", help="base URL of a running server (default: start one)")
    p.add_argument("--rooms", type=int, default=2)
    p.add_argument("--viewers-per-room", type=int, default=20)
    p.add_argument("--gifters", type=int, default=4, help="gifter sockets, spread over the rooms")
    p.add_argument("--rate", type=float, default=100.0, help="gifts per second, all gifters together")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of gifting")
    p.add_argument("--processes", type=int, default=1, help="client worker processes")
    p.add_argument("--gifters-apart", action="store_true",
                   help="every gifter in a client process of its own (worker0), the viewers in the others: "
                        "a gifter's ack is then never read late because its process was busy reading viewers")
    p.add_argument("--ceilings", action="store_true", help="also measure the bare ceilings on this machine")
    p.add_argument("--ceiling-duration", type=float, default=8.0)
    p.add_argument("--ceiling-tick-ms", type=float, default=20.0,
                   help="tick of the bare coalescing loop (its events of one tick go out as one frame)")
    p.add_argument("--ceiling-parts", default="all",
                   help="comma-separated subset of one,coalesced,paced,lua (default all)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--secret", help="token signing secret (default: GIFTSTREAM_SECRET, or a fresh one)")
    p.add_argument("--data-dir", help="the target's data dir (audit, SQLite check)")
    p.add_argument("--redis-url", help="the target's Redis, for audit")
    p.add_argument("--server-pid", type=int, help="the target's pid, for its RSS and CPU")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra env for the server the storm starts (e.g. GIFTSTREAM_GIFT_RATE_PER_S=100)")
    p.add_argument("--separate-settler", action="store_true",
                   help="start the server with --no-settler and run `giftstream settle` beside it")
    p.add_argument("--valkey-fsync", choices=["always", "everysec", "no"],
                   help="give the started server its own valkey with this AOF fsync policy "
                        "(default: the embedded one, appendfsync always)")
    p.add_argument("--stall-viewers", type=int, default=0, help="viewers of the first room that stop reading")
    p.add_argument("--stall-after", type=float, default=2.0, help="seconds into the storm they stop")
    p.add_argument("--settle-timeout", type=float, default=120.0)
    p.add_argument("--keep-data", action="store_true", help="keep the started server's data dir")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(f"[storm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# setup ---------------------------------------------------------------------------------------

async def setup(args: argparse.Namespace, t: Target, run: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Rooms (one host each), recharged gifters; returns room ids and member specs."""
    sem = asyncio.Semaphore(32)
    async with httpx.AsyncClient(base_url=t.base, timeout=60) as http:
        async def room(i: int) -> str:
            tok = auth.issue(t.secret, f"h{run}x{i}", role="host", name=f"host {i}")
            async with sem:
                r = await http.post("/v1/rooms", json={"title": f"storm {run} #{i}"},
                                    headers={"authorization": f"Bearer {tok}"})
            r.raise_for_status()
            return str(r.json()["room_id"])

        rooms = list(await asyncio.gather(*(room(i) for i in range(args.rooms))))
        per_gifter = args.rate * args.duration / max(1, args.gifters)
        coins = max(30, int(per_gifter * 1.5) + 100)

        async def recharge(uid: str, tok: str) -> None:
            left, n = coins, 0
            while left > 0:
                amount = max(30, min(COIN_CAP, left))
                async with sem:
                    r = await http.post("/v1/recharges", headers={"authorization": f"Bearer {tok}"}, json={
                        "coins": amount, "payment_method": "sandbox_card", "idempotency_key": f"storm-{n}"})
                if r.status_code not in (200, 201):
                    raise RuntimeError(f"recharge of {uid} failed: {r.status_code} {r.text[:200]}")
                left -= amount
                n += 1

        members: list[tuple[Any, ...]] = []
        recharges = []
        for i in range(args.gifters):
            uid = f"g{run}x{i}"
            tok = auth.issue(t.secret, uid, name=f"gifter {i}")
            members.append((uid, rooms[i % len(rooms)], tok, True, False))
            recharges.append(recharge(uid, tok))
        await asyncio.gather(*recharges)
    for r_i, room_id in enumerate(rooms):
        for v in range(args.viewers_per_room):
            uid = f"v{run}x{r_i}x{v}"
            stall = r_i == 0 and v < args.stall_viewers
            members.append((uid, room_id, auth.issue(t.secret, uid, name=f"viewer {v}"), False, stall))
    return rooms, members


def split(members: list[tuple[Any, ...]], n: int, gifters_apart: bool = False) -> list[list[tuple[Any, ...]]]:
    """Round-robin, so each worker has its share of gifters and of every room; with
    `gifters_apart`, worker 0 holds every gifter and the others share the viewers."""
    out: list[list[tuple[Any, ...]]] = [[] for _ in range(n)]
    gifters = [m for m in members if m[3]]
    viewers = [m for m in members if not m[3]]
    first = 1 if gifters_apart and n > 1 else 0
    for i, m in enumerate(gifters):
        out[0 if first else i % n].append(m)
    for i, m in enumerate(viewers):
        out[first + i % (n - first)].append(m)
    return out


def workers(args: argparse.Namespace) -> int:
    return max(2 if args.gifters_apart else 1, int(args.processes))


# sampling ------------------------------------------------------------------------------------

class Sampler:
    """Every 0.5 s: /healthz (outbox lag), RSS and CPU of the server, valkey and workers."""

    def __init__(self, t: Target, pids: dict[str, int | None]) -> None:
        self.t = t
        self.pids = {k: v for k, v in pids.items() if v}
        self.samples: list[dict[str, Any]] = []
        self._last: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        async with httpx.AsyncClient(base_url=self.t.base, timeout=5) as http:
            last_t = time.time()
            for name, pid in self.pids.items():
                self._last[name] = cpu_seconds(pid) or 0.0
            while True:
                await asyncio.sleep(0.5)
                s: dict[str, Any] = {"at": time.time()}
                try:
                    h = (await http.get("/healthz")).json()
                    s.update(outbox_lag_ms=h.get("outbox_lag_ms"), outbox_entries=h.get("outbox_entries"),
                             connections=h.get("connections"), healthz_ms=round(1000 * (time.time() - s["at"]), 1))
                except (httpx.HTTPError, ValueError):
                    s["healthz"] = "failed"
                now = time.time()
                for name, pid in self.pids.items():
                    cpu = cpu_seconds(pid)
                    if cpu is not None:
                        s[f"cpu_{name}"] = round(100 * (cpu - self._last[name]) / (now - last_t), 1)
                        self._last[name] = cpu
                if self.t.server_pid:
                    s["server_rss_kib"] = rss_kib(self.t.server_pid)
                last_t = now
                self.samples.append(s)


async def wait_drained(t: Target, timeout: float) -> dict[str, Any]:
    deadline = time.time() + timeout
    h: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=t.base, timeout=10) as http:
        while time.time() < deadline:
            h = (await http.get("/healthz")).json()
            if h.get("outbox_entries") == 0:
                return {"drained": True, "outbox_entries": 0}
            await asyncio.sleep(0.25)
    return {"drained": False, "outbox_entries": h.get("outbox_entries")}


# the run -------------------------------------------------------------------------------------

async def recv(pipe: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, pipe.recv)


async def storm(args: argparse.Namespace, t: Target) -> dict[str, Any]:
    run = secrets.token_hex(3)
    log(args, f"setting up {args.rooms} rooms, {args.gifters} gifters against {t.base}")
    rooms, members = await setup(args, t, run)
    rss_before = rss_kib(t.server_pid) if t.server_pid else None
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    shares = split(members, workers(args), args.gifters_apart)
    for i, share in enumerate(shares):
        ours, theirs = ctx.Pipe()
        rate = args.rate * sum(1 for m in share if m[3]) / max(1, args.gifters)
        host, port = t.ws_address(i)
        spec = {"index": i, "host": host, "port": port, "rate": rate, "run_id": run, "members": share}
        proc = ctx.Process(target=worker_main, args=(spec, theirs), daemon=True)
        proc.start()
        procs.append(proc)
        pipes.append(ours)
    try:
        return await _drive(args, t, rooms, members, procs, pipes, rss_before)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


async def _drive(args: argparse.Namespace, t: Target, rooms: list[str], members: list[Any], procs: list[Any],
                 pipes: list[Any], rss_before: int | None) -> dict[str, Any]:
    log(args, f"connecting {len(members)} sockets in {len(procs)} worker(s)")
    ready = [(await recv(p))[1] for p in pipes]
    connect = {"members": sum(r["members"] for r in ready), "connected": sum(r["connected"] for r in ready),
               "failures": {k: v for r in ready for k, v in r["failures"].items()},
               "connect_s": max(r["connect_s"] for r in ready)}
    await asyncio.sleep(1.5)  # let presence settle before measuring memory
    rss_connected = rss_kib(t.server_pid) if t.server_pid else None
    log(args, f"{connect['connected']}/{connect['members']} joined in {connect['connect_s']}s; "
              f"storm of {args.rate:g} gifts/s for {args.duration:g}s")
    sampler = Sampler(t, {"server": t.server_pid, "valkey": t.valkey_pid(), "settler": t.settler_pid(),
                          **{f"worker{i}": p.pid for i, p in enumerate(procs)}})
    await asyncio.to_thread(t.valkey_watch)
    sampler.start()
    t0 = time.time() + 0.5
    for p in pipes:
        p.send(("go", t0, args.duration, args.stall_after if args.stall_viewers else None))
    gift_results = [(await recv(p))[1] for p in pipes]
    log(args, "gifting done; waiting for settlement")
    gifts = rep.merge_gifts(gift_results)
    cols = gifts.pop("cols")
    settlement = await wait_drained(t, args.settle_timeout)
    await sampler.stop()
    valkey = await asyncio.to_thread(t.valkey_figures)
    expected, clashes = rep.expected_by_room(cols)
    for room in rooms:
        expected.setdefault(room, {})
    for i, p in enumerate(pipes):
        mine = {m[1] for m in split(members, len(pipes), args.gifters_apart)[i]}
        p.send(("verify", {r: e for r, e in expected.items() if r in mine}, t0))
    log(args, "checking deliveries, audit and ledger")
    delivered = [(await recv(p))[1] for p in pipes]
    for p in pipes:
        p.send(("close",))
    code, audit_json, audit_err = await asyncio.to_thread(t.audit)
    audit = {"ran": audit_json is not None, "exit": code, "ok": code == 0 and bool(audit_json and audit_json["ok"]),
             "failures": (audit_json or {}).get("failures", audit_err), "totals": (audit_json or {}).get("totals")}
    settlement.update(rep.settle_check(await asyncio.to_thread(t.settled_gifts, rooms), cols))
    acks = rep.ack_figures(cols, t0, args.duration)
    deliveries = rep.merge_deliveries(delivered, args.duration)
    if args.gifters_apart:
        # The viewers' own figures: the workers that hold no gifter.
        deliveries["viewers_vs_send"] = rep.merge_deliveries(delivered[1:], args.duration)["vs_send"]
    failures = rep.verdict(gifts, clashes, deliveries, audit, settlement, connect)
    report = build(args, t, gifts, acks, deliveries, settlement, audit, connect, sampler.samples, failures,
                   rss_before, rss_connected, t0)
    report["valkey"] = valkey
    return report


def code_version() -> str:
    """The commit the server code came from, '+dirty' when server/ has uncommitted edits."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    snapshot = root / "SNAPSHOT"  # a `git archive` copy taken for benchmarking names its commit here
    if snapshot.exists():
        return snapshot.read_text().strip()
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "server"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def cpu_per_gift(samples: list[dict[str, Any]], t0: float, duration: float, acked: int) -> dict[str, float]:
    """Microseconds of CPU per acked gift, per process and in total, from the samples that fall
    inside the gifting window (each sample's percentage covers the interval before it)."""
    window = [s for s in samples if t0 < s["at"] <= t0 + duration]
    if len(window) < 2 or not acked:
        return {}
    rate = acked / duration
    out: dict[str, float] = {}
    for key in sorted({k for s in window[1:] for k in s if k.startswith("cpu_")}):
        busy = sum(s.get(key, 0.0) for s in window[1:]) / (len(window) - 1) / 100  # cores, averaged
        out[key.removeprefix("cpu_")] = round(busy / rate * 1e6, 1)
    out["total"] = round(sum(out.values()), 1)
    return out


def build(args: argparse.Namespace, t: Target, gifts: dict[str, Any], acks: dict[str, Any],
          deliveries: dict[str, Any], settlement: dict[str, Any], audit: dict[str, Any], connect: dict[str, Any],
          samples: list[dict[str, Any]], failures: list[str], rss_before: int | None, rss_connected: int | None,
          t0: float) -> dict[str, Any]:
    ack_hist, d_ack, d_send = acks["hist"], deliveries["vs_ack"], deliveries["vs_send"]
    conns = connect["connected"]
    per_conn = None
    if rss_before is not None and rss_connected is not None and conns:
        per_conn = round((rss_connected - rss_before) / conns, 2)
    run_samples = [s for s in samples if s["at"] >= t0]
    per_gift = cpu_per_gift(samples, t0, args.duration, acks["acks_in_window"])
    for s in samples:
        s["t"] = round(s.pop("at") - t0, 2)
    cpu = {k: round(sum(s[k] for s in run_samples if k in s) / max(1, len(run_samples)), 1)
           for k in {k for s in run_samples for k in s if k.startswith("cpu_")}}
    peak_rss = max((s.get("server_rss_kib") or 0 for s in samples), default=None)
    return {
        "acks_per_s": round(acks["acks_in_window"] / args.duration, 1),
        "ack_p99_ms": ack_hist.summary()["p99_ms"],
        "deliveries_per_s": round(deliveries["in_window"] / args.duration, 1),
        "delivery_p99_ms": d_ack.summary()["p99_ms"],
        "settle_lag_p99_ms": rep.lag_p99(run_samples),
        "rss_per_conn_kib": per_conn,
        "verdict": "ok" if not failures else "fail",
        "failures": failures,
        "ceilings": {},
        "room": {},
        "config": {k: getattr(args, k) for k in ("target", "rooms", "viewers_per_room", "gifters", "rate",
                                                  "duration", "processes", "gifters_apart", "stall_viewers",
                                                  "stall_after", "server_env", "separate_settler",
                                                  "valkey_fsync")},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        # The gifting window's start (epoch seconds), to line other measurements up with it.
        "t0": t0,
        "server_code": code_version(),
        "gifts": dict(gifts),
        "acks": {**ack_hist.summary(), "in_window": acks["acks_in_window"]},
        "deliveries": {"vs_ack": d_ack.summary(), "vs_send": d_send.summary(), "in_window": deliveries["in_window"],
                       **({"viewers_vs_send": deliveries["viewers_vs_send"].summary()}
                          if "viewers_vs_send" in deliveries else {}),
                       **{k: v for k, v in deliveries.items()
                          if k not in ("vs_ack", "vs_send", "viewers_vs_send", "in_window", "series")}},
        "settlement": settlement,
        "audit": audit,
        "connections": connect,
        "server": {"pid": t.server_pid, "rss_kib_before_sockets": rss_before, "rss_kib_connected": rss_connected,
                   "rss_kib_peak": peak_rss, "avg_cpu_percent": cpu},
        # CPU each process spent per acked gift while gifting (not joining, draining or checking):
        # what a gift costs the machine, the figure capacity is planned with.
        "cpu_us_per_gift": per_gift,
        "series": {"acks": acks["series"], "deliveries": deliveries["series"], "samples": samples},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    secret = args.secret or os.environ.get("GIFTSTREAM_SECRET") or (None if args.target else secrets.token_urlsafe(24))
    if args.target and not secret and args.data_dir:
        secret = (Path(args.data_dir) / "secret").read_text().strip()
    if not secret:
        raise SystemExit("a --target needs --secret (or GIFTSTREAM_SECRET, or --data-dir with its secret file)")
    if args.target:
        t = Target(args.target, secret, Path(args.data_dir) if args.data_dir else None, args.redis_url,
                   args.server_pid)
    else:
        env = dict(kv.split("=", 1) for kv in args.server_env)
        t = Target.start(secret, env, keep=args.keep_data, separate_settler=args.separate_settler,
                         valkey_fsync=args.valkey_fsync)
        log(args, f"started giftstream serve pid {t.server_pid} on {t.base}, data in {t.data_dir}")
    try:
        report = asyncio.run(storm(args, t))
    finally:
        if not args.target:
            t.stop()
    if args.ceilings:
        from loadtests.ceilings import measure

        log(args, "measuring ceilings")
        try:
            report["ceilings"] = measure(args.viewers_per_room, args.rate, args.ceiling_duration,
                                         args.ceiling_tick_ms, args.ceiling_parts.split(","))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            # The storm's own figures stand; the yardstick is reported missing, not guessed.
            report["ceilings"] = {"error": str(exc)[-500:]}
    report["room"] = rep.room_figures(report)
    text = json.dumps(report, indent=1, default=str)
    if args.report:
        Path(args.report).write_text(text)
    summary = {k: report[k] for k in rep.KEYS}
    print(json.dumps(summary, indent=1))
    return 0 if report["verdict"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
