"""Join storm: N viewers join one room at a set rate, then G gifts/s, every delivery counted.

    python -m loadtests.joinstorm --viewers 3000 --join-rate 1000 --gift-rate 10 --duration 10

    python -m loadtests.joinstorm --viewers 100000 --server-workers 7 --join-rate 5000 \
        --gift-rate 10 --duration 20 --report big.json

Without --target it starts its own `giftstream serve` (embedded valkey, SQLite; with
--server-workers N, `serve --workers N`) on a temp data dir. The viewers are split over
--processes client processes (at most ~15,000 sockets each: a process here may hold 20,000
open files), process i binding its sockets to source address 127.0.0.<2+i> (one address has
about 28,000 ephemeral ports). Each process joins its share at its share of the rate; then a
few sender sockets in this process send --gift-rate gifts/s for --duration seconds, and each
viewer process reports how many sockets got every acked gift exactly once (a count and a
checksum of gift ids per socket) and the delivery latency (receive time minus the event's `ts`,
the gift's debit, both clocks of this machine), every delivery to every socket counted.

Gateway memory is the RSS of the gateway processes (every uvicorn worker under --workers N),
read from /proc; CPU per join is theirs over the join phase divided by the joins. Bounded:
the joins, the gifts and every wait have an end; every address is on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import msgpack

from loadtests.stats import Hist
from loadtests.target import Target, cpu_seconds, raise_fd_limit, rss_kib
from loadtests.viewers import CHECKSUM_MOD, EVENTS_PREFIX, SUBPROTOCOL, gift_hash, pool_main
from loadtests.wsclient import WSClient, connect
from server import auth

SOCKETS_PER_PROCESS = 15_000
SOURCE_BASE = 2  # 127.0.0.2 and up; the server listens on 127.0.0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.joinstorm", description=__doc__.split("\n")[0])
    p.add_argument("--target", help="base URL of a running server (default: start one)")
    p.add_argument("--secret", help="token secret of --target (or GIFTSTREAM_SECRET)")
    p.add_argument("--server-pid", type=int, help="pid of --target's `giftstream serve`, for its memory and CPU")
    p.add_argument("--server-workers", type=int, default=1, help="`serve --workers N` for the server it starts")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--viewers", type=int, default=1000)
    p.add_argument("--processes", type=int, help=f"client processes (default: one per {SOCKETS_PER_PROCESS:,})")
    p.add_argument("--join-rate", type=float, default=1000.0, help="joins per second, all processes together")
    p.add_argument("--gift-rate", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of gifting (0: join only)")
    p.add_argument("--senders", type=int, default=2, help="sockets sending the gifts")
    p.add_argument("--deliver-wait", type=float, default=60.0, help="seconds to wait for the last deliveries")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--keep-data", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.processes is None:
        args.processes = max(1, math.ceil(args.viewers / SOCKETS_PER_PROCESS))
    if args.viewers / args.processes > 28_000:
        p.error("more than ~28,000 sockets from one source address: add --processes")
    if not 0 < args.processes <= 250:
        p.error("--processes must be 1..250 (one 127.0.0.x source address each)")
    return args


def log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(f"[joinstorm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# the gateway's processes ---------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def gateway_pids(server_pid: int | None) -> dict[str, list[int]]:
    """The serve process and its children, by role: the gateway(s) and the rest (valkey, the
    multiprocessing helpers). Under --workers N the serve process only supervises."""
    if not server_pid:
        return {"gateways": [], "supervisor": [], "valkey": []}
    kids = _children(server_pid)
    workers = [k for k in kids if "multiprocessing" in _cmdline(k) and "resource_tracker" not in _cmdline(k)]
    valkey = [k for k in kids if "valkey" in _cmdline(k)]
    if workers:
        return {"gateways": workers, "supervisor": [server_pid], "valkey": valkey}
    return {"gateways": [server_pid], "supervisor": [], "valkey": valkey}


def _open_files(pid: int) -> int:
    """Open files of a process: its sockets, give or take the few it keeps (Redis, logs)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Meter:
    """RSS and CPU of the gateway processes at one moment (the serve's children as they are now:
    uvicorn replaces a worker that died or hung)."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        server = pids["supervisor"][0] if pids["supervisor"] else (pids["gateways"] or [0])[0]
        self.pids = gateway_pids(server) if server else pids
        pids = self.pids
        self.at = time.time()
        self.rss = {p: rss_kib(p) or 0 for ps in pids.values() for p in ps}
        self.cpu = {p: cpu_seconds(p) or 0.0 for ps in pids.values() for p in ps}
        self.files = {p: _open_files(p) for p in pids["gateways"]}

    def gateway_rss_kib(self) -> int:
        return sum(self.rss.get(p, 0) for p in self.pids["gateways"])

    def cpu_since(self, before: Meter, role: str) -> float:
        """CPU of the processes of `role` since `before` (a process new since then: all of its)."""
        return sum(self.cpu.get(p, 0.0) - before.cpu.get(p, 0.0) for p in self.pids[role])

    def replaced(self, before: Meter) -> int:
        """Gateway processes that are gone since `before` (died, or killed as hung)."""
        return len(set(before.pids["gateways"]) - set(self.pids["gateways"]))


# setup and senders ---------------------------------------------------------------------------

async def make_room(t: Target, run: str, senders: int, gifts: int) -> tuple[str, list[tuple[str, str]]]:
    async with httpx.AsyncClient(base_url=t.base, timeout=60) as http:
        host = auth.issue(t.secret, f"jh{run}", role="host", name="join storm host")
        r = await http.post("/v1/rooms", json={"title": f"join storm {run}"},
                            headers={"authorization": f"Bearer {host}"})
        r.raise_for_status()
        room = str(r.json()["room_id"])
        out = []
        coins = max(30, gifts // max(1, senders) + 50)
        for i in range(senders):
            uid = f"js{run}x{i}"
            tok = auth.issue(t.secret, uid, name=f"sender {i}")
            r = await http.post("/v1/recharges", headers={"authorization": f"Bearer {tok}"}, json={
                "coins": coins, "payment_method": "sandbox_card", "idempotency_key": f"js-{run}-{i}"})
            if r.status_code not in (200, 201):
                raise RuntimeError(f"recharge failed: {r.status_code} {r.text[:200]}")
            out.append((uid, tok))
    return room, out


class Senders:
    """A few sockets sending gifts at a fixed rate; each acked gift's id is what every viewer
    must get."""

    def __init__(self, t: Target, room: str, tokens: list[tuple[str, str]], run: str) -> None:
        self.t, self.room, self.tokens, self.run = t, room, tokens, run
        self.socks: list[WSClient] = []
        self.pending: dict[str, float] = {}
        self.acked: dict[str, str] = {}
        self.ack_ms = Hist()
        self.errors: Counter[str] = Counter()
        self.seq = 0

    async def connect(self) -> None:
        for _, tok in self.tokens:
            path = f"/v1/rooms/{self.room}/ws?token={tok}"
            self.socks.append(await connect(self.t.host, self.t.port, path, SUBPROTOCOL, self.on_message,
                                            lambda code: None))

    def on_message(self, payload: bytes, now: float) -> None:
        if payload.startswith(EVENTS_PREFIX):
            return  # room events: the viewers count those
        msg = msgpack.unpackb(payload, raw=False)
        if msg.get("type") == "ack":
            sent = self.pending.pop(str(msg["id"]), None)
            if sent is not None:
                self.acked[str(msg["id"])] = str(msg["gift_id"])
                self.ack_ms.add((now - sent) * 1000)
        elif msg.get("type") == "error":
            self.errors[str(msg.get("code"))] += 1
            self.pending.pop(str(msg.get("id")), None)

    async def send(self, rate: float, duration: float) -> None:
        total = int(rate * duration)
        t0 = time.time()
        while self.seq < total:
            due = min(total, int((time.time() - t0) * rate) + 1)
            while self.seq < due:
                sock = self.socks[self.seq % len(self.socks)]
                cid = f"{self.run}-{self.seq}"
                self.seq += 1
                self.pending[cid] = time.time()
                sock.send(msgpack.packb({"type": "gift", "id": cid, "gift": "rose", "count": 1}))
            await asyncio.sleep(0.005)
        deadline = time.time() + 30
        while self.pending and time.time() < deadline:
            await asyncio.sleep(0.05)

    def close(self) -> None:
        for s in self.socks:
            s.close()


# the run -------------------------------------------------------------------------------------

async def recv(pipe: Any, timeout: float = 600.0) -> Any:
    """The next message of a viewer process; a process that died (its end closed) or said nothing
    for `timeout` seconds ends the storm with an error, not a hang."""
    def wait() -> Any:
        if not pipe.poll(timeout):
            raise TimeoutError(f"a viewer process said nothing for {timeout:g}s")
        return pipe.recv()

    return await asyncio.get_running_loop().run_in_executor(None, wait)


async def joinstorm(args: argparse.Namespace, t: Target) -> dict[str, Any]:
    run = secrets.token_hex(3)
    gifts_planned = int(args.gift_rate * args.duration)
    room, sender_tokens = await make_room(t, run, args.senders, gifts_planned)
    pids = gateway_pids(t.server_pid)
    log(args, f"room {room}; gateway processes {pids['gateways']}; {args.viewers} viewers in "
              f"{args.processes} processes at {args.join_rate:g} joins/s")
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    base, extra = divmod(args.viewers, args.processes)
    for i in range(args.processes):
        ours, theirs = ctx.Pipe()
        count = base + (1 if i < extra else 0)
        spec = {"host": t.host, "port": t.port, "source": f"127.0.0.{SOURCE_BASE + i}", "room": room,
                "secret": t.secret, "prefix": f"jv{run}x{i}x", "count": count,
                "rate": args.join_rate * count / args.viewers}
        proc = ctx.Process(target=pool_main, args=(spec, theirs), daemon=True)
        proc.start()
        theirs.close()  # the child's end is the child's: its death then ends our reads (EOFError)
        procs.append(proc)
        pipes.append(ours)
    try:
        for p in pipes:
            await recv(p)
        await asyncio.sleep(1.0)
        before = Meter(pids)
        t0 = time.time() + 0.5
        for p in pipes:
            p.send(("join", t0))
        joined = [(await recv(p))[1] for p in pipes]
        after_join = Meter(pids)
        log(args, f"{sum(j['joined'] for j in joined)} joined; failures "
                  f"{dict(sum((Counter(j['failed']) for j in joined), Counter()))}")
        await asyncio.sleep(2.0)  # presence settles, freed handshake memory is reused
        settled = Meter(pids)
        report: dict[str, Any] = {"joins": join_figures(joined, t0, before, after_join, settled)}
        senders = Senders(t, room, sender_tokens, run)
        if args.duration > 0:
            await senders.connect()
            g0 = Meter(pids)
            log(args, f"gifting {args.gift_rate:g}/s for {args.duration:g}s")
            await senders.send(args.gift_rate, args.duration)
            g1 = Meter(pids)
            checksum = sum(gift_hash(g) for g in senders.acked.values()) % CHECKSUM_MOD
            for p in pipes:
                p.send(("expect", len(senders.acked), checksum, args.deliver_wait))
            delivered = [(await recv(p))[1] for p in pipes]
            report["gifts"] = gift_figures(args, senders, delivered, g0, g1)
            senders.close()
        for p in pipes:
            p.send(("close",))
    finally:
        for proc in procs:
            proc.join(15)
            if proc.is_alive():
                proc.kill()
    report["config"] = {k: getattr(args, k) for k in ("viewers", "processes", "join_rate", "gift_rate",
                                                      "duration", "senders", "server_workers", "server_env")}
    report["sources"] = [f"127.0.0.{SOURCE_BASE + i}" for i in range(args.processes)]
    report["gateway_processes"] = len(pids["gateways"])
    report["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))
    return report


def join_figures(joined: list[dict[str, Any]], t0: float, before: Meter, after: Meter,
                 settled: Meter) -> dict[str, Any]:
    n = sum(j["joined"] for j in joined)
    last = max((j["last_welcome"] for j in joined if j["last_welcome"]), default=t0)
    hist = Hist()
    for j in joined:
        hist.merge(Hist.load(j["join_ms"]))
    per_s: Counter[int] = Counter()
    for j in joined:
        per_s.update(dict(j["per_s"]))
    cpu = after.cpu_since(before, "gateways")
    took = max(1e-9, last - t0)
    rss_before, rss_after = before.gateway_rss_kib(), settled.gateway_rss_kib()
    return {
        "requested": sum(j["count"] for j in joined), "joined": n, "attempts": sum(j["attempts"] for j in joined),
        "failed": dict(sum((Counter(j["failed"]) for j in joined), Counter())),
        "errors": dict(sum((Counter(j["errors"]) for j in joined), Counter())),
        "closed_after_join": dict(sum((Counter(j["closes"]) for j in joined), Counter())),
        "join_s": round(took, 2), "joins_per_s": round(n / took, 1),
        "peak_joins_per_s": max(per_s.values(), default=0), "per_s": sorted(per_s.items()),
        "join_latency": hist.summary(),
        "gateway_cpu_s": round(cpu, 2), "gateway_cpu_ms_per_join": round(1000 * cpu / n, 3) if n else None,
        # The gateway holding its sockets with nothing to send (the 2 s after the last welcome):
        # what the joined sockets cost a second on their own, in cores.
        "gateway_cores_settled": round(settled.cpu_since(after, "gateways") / max(1e-9, settled.at - after.at), 3),
        "client_cpu_s": round(sum(j["cpu_s"] for j in joined), 2),
        "gateway_rss_mib_before": round(rss_before / 1024, 1), "gateway_rss_mib_joined": round(rss_after / 1024, 1),
        "gateway_rss_kib_per_socket": round((rss_after - rss_before) / n, 2) if n else None,
        "gateway_rss_mib_by_process": [round(settled.rss.get(p, 0) / 1024, 1) for p in settled.pids["gateways"]],
        "gateway_open_files_by_process": [settled.files.get(p, 0) for p in settled.pids["gateways"]],
        "valkey_rss_mib": round(sum(settled.rss.get(p, 0) for p in settled.pids["valkey"]) / 1024, 1),
        "gateway_processes_replaced": settled.replaced(before),
    }


def gift_figures(args: argparse.Namespace, senders: Senders, delivered: list[dict[str, Any]],
                 g0: Meter, g1: Meter) -> dict[str, Any]:
    latency, spread = Hist(), Hist()
    for d in delivered:
        latency.merge(Hist.load(d["latency_ms"]))
        spread.merge(Hist.load(d["frame_spread_ms"]))
    sockets = sum(d["sockets"] for d in delivered)
    acked = len(senders.acked)
    return {
        "sent": senders.seq, "acked": acked, "unacked": len(senders.pending), "errors": dict(senders.errors),
        "ack": senders.ack_ms.summary(),
        "sockets": sockets, "sockets_exact": sum(d["exact"] for d in delivered),
        "sockets_short": sum(d["short"] for d in delivered),
        "sockets_closed": sum(d["closed"] for d in delivered),
        "expected_deliveries": acked * sockets, "deliveries": sum(d["deliveries"] for d in delivered),
        "missing_events": sum(d["missing_events"] for d in delivered),
        "extra_events": sum(d["extra_events"] for d in delivered),
        "overlapping_frames": sum(d["overlapping_frames"] for d in delivered),
        "delivery_latency": latency.summary(),
        "frame_spread_per_process": spread.summary(),
        "frames_per_process": [d["frames"] for d in delivered],
        "frames_per_s": round(max((d["frames"] for d in delivered), default=0) / max(1e-9, args.duration), 2),
        "gateway_cpu_s": round(g1.cpu_since(g0, "gateways"), 2),
        "gateway_rss_mib": round(g1.gateway_rss_kib() / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    secret = args.secret or os.environ.get("GIFTSTREAM_SECRET") or (None if args.target else secrets.token_urlsafe(24))
    if not secret:
        raise SystemExit("a --target needs --secret (or GIFTSTREAM_SECRET)")
    if args.target:
        t = Target(args.target, secret, None, None, args.server_pid)
    else:
        env = dict(kv.split("=", 1) for kv in args.server_env)
        extra = ["--workers", str(args.server_workers)] if args.server_workers > 1 else []
        t = Target.start(secret, env, keep=args.keep_data, args=extra)
        log(args, f"started giftstream serve pid {t.server_pid} on {t.base}, data in {t.data_dir}")
    try:
        report = asyncio.run(joinstorm(args, t))
    finally:
        if not args.target:
            t.stop()
    text = json.dumps(report, indent=1, default=str)
    if args.report:
        Path(args.report).write_text(text)
    j, g = report["joins"], report.get("gifts", {})
    summary = {"joined": j["joined"], "joins_per_s": j["joins_per_s"],
               "gateway_cpu_ms_per_join": j["gateway_cpu_ms_per_join"],
               "gateway_rss_mib_joined": j["gateway_rss_mib_joined"],
               "gateway_rss_kib_per_socket": j["gateway_rss_kib_per_socket"],
               "join_p99_ms": j["join_latency"]["p99_ms"], "failed": j["failed"]}
    if g:
        summary.update(acked=g["acked"], sockets=g["sockets"], sockets_exact=g["sockets_exact"],
                       deliveries=g["deliveries"], expected_deliveries=g["expected_deliveries"],
                       delivery_p50_ms=g["delivery_latency"]["p50_ms"], delivery_p99_ms=g["delivery_latency"]["p99_ms"],
                       frames_per_s=g["frames_per_s"])
    print(json.dumps(summary, indent=1))
    ok = j["joined"] == j["requested"] and (not g or g["sockets_exact"] == g["sockets"] == j["joined"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
