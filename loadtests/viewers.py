"""One join-storm process: thousands of thin viewer sockets of one room, from one source address.

A viewer is a bare non-blocking socket with a pre-built handshake (the same bytes but the
token), in one epoll set of its process that the event loop watches as a single reader: no task,
future, transport or loop handle per socket. The generator shares two cores with the gateway it
measures, so it must cost as little per socket and per frame as it can (asyncio's
sock_connect + create_connection took ~0.17 ms of CPU a join; this path is a socket, a connect,
one send and two epoll_ctl calls). It still
reads every frame: each socket counts the gift events it got (and a checksum of their ids),
so the coordinator can tell that every socket got every acked gift exactly once.

Every socket of the room gets the same `events` frame, so a frame is decoded once per process
(`Frames`, found by its bytes) and a socket only adds the
frame's count and checksum and appends its receive time; latencies are computed from those
times after the storm, off the hot path.

Talks to the coordinator (loadtests/joinstorm.py) over a pipe:
  -> ("ready", {})         <- ("join", t0)
  -> ("joined", figures)   <- ("expect", gifts, checksum, wait_s)
  -> ("delivered", figures) <- ("close",)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import gc
import hashlib
import os
import resource
import select
import socket
import struct
import sys
import time
from array import array
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import msgpack

from loadtests.stats import Hist, np
from loadtests.wsclient import OP_CLOSE, OP_PING, OP_PONG, client_frame, frame_head
from server import auth

SUBPROTOCOL = "giftstream.msgpack"
# msgpack of {"type": "events", "events": [...]}: the server packs "type" first.
EVENTS_PREFIX = b"\x82\xa4type\xa6events"
# Any key will do: the server's accept header is not checked, only its 101.
KEY = base64.b64encode(b"giftstream-joins").decode()
# Handshakes of one process in flight at once; more wait (a server that is behind is not
# flooded with SYNs it cannot accept: a dropped SYN costs its join a 1 s retransmit).
MAX_OUTSTANDING = 500
# A handshake that has no welcome this long after it started has failed.
JOIN_TIMEOUT_S = 60.0
RETRIES = 5
QUIET_S = 5.0
CHECKSUM_MOD = 1 << 64
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2+
# Source addresses a process spreads its sockets over: its own 127.0.0.x and 127.k.0.x. A connect
# looks for a free port of its address pair from a hashed start, even ports first (about 14,000
# of the 28,000); by 14,000 sockets on one address that search walked most of them each time and
# the generator's CPU a join doubled (0.08 ms at 12,500 sockets an address, 0.155 at 14,285).
ADDRESSES_PER_PROCESS = 4
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLL_FAILED = select.EPOLLERR | select.EPOLLHUP
# Bytes read at once: a welcome, or a few frames of the room.
RECV_BYTES = 1 << 16
# Whole frames known to carry no gift (viewer counts, leaderboards) kept for the fast path.
NOOP_FRAMES_MAX = 4096


def gift_hash(gift_id: str) -> int:
    """A gift id's share of a socket's checksum: with the count, shows each gift came once."""
    return int.from_bytes(hashlib.blake2b(gift_id.encode(), digest_size=8).digest(), "big")


def offset_key(offset: str) -> int:
    ms, _, seq = offset.partition("-")
    return (int(ms) << 24) | int(seq or 0)


def source_addresses(source: str) -> list[str]:
    """127.0.0.x and its siblings 127.k.0.x: all loopback, each its own set of ports."""
    a, _, _, d = source.split(".")
    return [f"{a}.{k}.0.{d}" for k in range(ADDRESSES_PER_PROCESS)]


def handshake(host: str, port: int, room: str, token: str) -> bytes:
    return (f"GET /v1/rooms/{room}/ws?token={token} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n").encode()


class Frames:
    """The distinct `events` frames this process saw, each decoded once, found by its raw bytes."""

    def __init__(self) -> None:
        self.index: dict[bytes, int] = {}
        self.count: list[int] = []
        self.checksum: list[int] = []
        self.first: list[int] = []
        self.last: list[int] = []
        self.ts: list[tuple[int, ...]] = []
        self.arrivals: list[array[float]] = []
        # Whole `events` frames with no gift in them, by their bytes. A read that is exactly one
        # of these, on an open socket with nothing buffered, needs no parse at all: the room's
        # viewer-count pushes reach every socket while 100,000 join, and parsing each one was
        # most of the generator's CPU at that size.
        self.noop: set[bytes] = set()

    def lookup(self, raw: bytes, head: int) -> int:
        # By the whole frame: two workers' frames of one room can share their length and tail
        # (the same last event after different first ones), and a lookup by those alone took
        # them for new frames each time they alternated.
        idx = self.index.get(raw)
        if idx is None:
            idx = self.index[bytes(raw)] = self._add(raw[head:])
        return idx

    def _add(self, payload: bytes) -> int:
        events = msgpack.unpackb(payload, raw=False)["events"]
        keys = [offset_key(e["offset"]) for e in events if "offset" in e]
        gifts = [e for e in events if e.get("type") == "gift" and "offset" in e]
        self.count.append(len(gifts))
        self.checksum.append(sum(gift_hash(e["gift_id"]) for e in gifts) % CHECKSUM_MOD)
        self.first.append(keys[0] if keys else -1)
        self.last.append(keys[-1] if keys else -1)
        self.ts.append(tuple(int(e["ts"]) for e in gifts))
        self.arrivals.append(array("d"))
        return len(self.count) - 1


class Viewer:
    __slots__ = ("pool", "request", "source", "sock", "buf", "open", "started", "joined_at", "last", "gifts",
                 "checksum", "overlaps", "close_code", "closed", "attempts")

    def __init__(self, pool: Pool, request: bytes, source: str) -> None:
        self.pool = pool
        self.request = request
        self.source = source
        self.sock: socket.socket | None = None
        self.buf = b""
        self.open = False
        self.started = 0.0
        self.joined_at = 0.0
        # The newest event offset this socket has (its welcome's, then its frames').
        self.last = -1
        self.gifts = 0
        self.checksum = 0
        self.overlaps = 0
        self.close_code: int | None = None
        self.closed = False
        self.attempts = 0

    def send(self, data: bytes) -> None:
        # Only the handshake, a pong or a close reply: a few hundred bytes into an empty buffer.
        assert self.sock is not None
        with contextlib.suppress(OSError):
            self.sock.send(data)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.buf:
            data, self.buf = self.buf + data, b""
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                self.pool.refused(self, data[: data.find(b"\r\n")].decode(errors="replace"))
                return
            self.open = True
            data = data[end + 4 :]
        pos, n = 0, len(data)
        while (frame := frame_head(data, pos)) is not None:
            head, length = frame
            end = pos + head + length
            if end > n:
                break
            op = data[pos] & 0x0F
            if op == 2:
                if data.startswith(EVENTS_PREFIX, pos + head):
                    self._events(data if pos == 0 and end == n else data[pos:end], head, now)
                else:
                    self._message(data[pos + head : end], now)
            elif op == OP_PING:
                self.send(client_frame(data[pos + head : end], OP_PONG))
            elif op == OP_CLOSE:
                body = data[pos + head : end]
                self.close_code = struct.unpack("!H", body[:2])[0] if len(body) >= 2 else 1005
                self.send(client_frame(body[:2], OP_CLOSE))
                self.pool.drop(self)
                return
            pos = end
        if pos < n:
            self.buf = data[pos:]

    def _events(self, raw: bytes, head: int, now: float) -> None:
        frames = self.pool.frames
        idx = frames.lookup(raw, head)
        count = frames.count[idx]
        if not count:
            if len(frames.noop) < NOOP_FRAMES_MAX:
                frames.noop.add(bytes(raw))
            return  # presence, leaderboard
        if frames.first[idx] <= self.last:
            self.overlaps += 1  # already had some of these: counted, never added twice
            return
        self.last = frames.last[idx]
        self.gifts += count
        self.checksum += frames.checksum[idx]
        frames.arrivals[idx].append(now)

    def _message(self, payload: bytes, now: float) -> None:
        msg = msgpack.unpackb(payload, raw=False)
        kind = msg.get("type")
        if kind == "welcome":
            self.joined_at = now
            self.last = offset_key(msg["offset"])
            self.request = b""  # not needed again: memory
            self.pool.welcomed(self)
        elif kind == "error":
            self.pool.errors[str(msg.get("code"))] += 1


class Pool:
    """This process's viewers: joining them at a rate, then what they received."""

    def __init__(self, spec: dict[str, Any], pipe: Connection) -> None:
        self.pipe = pipe
        self.host: str = spec["host"]
        self.port: int = spec["port"]
        self.source: str = spec["source"]
        self.rate: float = spec["rate"]
        self.frames = Frames()
        tokens = (auth.issue(spec["secret"], f"{spec['prefix']}{i}", name=f"v{i}", ttl_s=3600)
                  for i in range(spec["count"]))
        sources = source_addresses(self.source)
        self.viewers = [Viewer(self, handshake(self.host, self.port, spec["room"], t), sources[i % len(sources)])
                        for i, t in enumerate(tokens)]
        self.outstanding = 0
        self.joined = 0
        self.failed: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        self.said = time.time()
        # Every socket of this process, by fd, in one epoll set the loop watches as one reader.
        self.epoll = select.epoll()
        self.by_fd: dict[int, Viewer] = {}

    # joining ---------------------------------------------------------------------------------

    async def join_all(self, t0: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.epoll.fileno(), self._poll)
        while time.time() < t0:
            await asyncio.sleep(min(0.01, t0 - time.time()))
        cpu0 = _cpu()
        queue = list(reversed(self.viewers))
        total = len(queue)
        started = 0
        while queue:
            due = min(total, int((time.time() - t0) * self.rate) + 1) - started
            while due > 0 and queue and self.outstanding < MAX_OUTSTANDING:
                v = queue.pop()
                started += 1
                due -= 1
                self._start(loop, v)
            await asyncio.sleep(0.002)
            self._progress(t0, started)
        deadline = time.time() + JOIN_TIMEOUT_S
        while self.outstanding and time.time() < deadline:
            await asyncio.sleep(0.02)
            self._progress(t0, started)
        self.failed["no welcome in time"] += self.outstanding
        done = [v.joined_at for v in self.viewers if v.joined_at]
        hist = Hist()
        for v in self.viewers:
            if v.joined_at:
                hist.add((v.joined_at - v.started) * 1000)
        per_s: Counter[int] = Counter(int(t - t0) for t in done)
        return {"joined": self.joined, "count": len(self.viewers), "failed": dict(self.failed),
                "errors": dict(self.errors), "closes": dict(self.closes),
                "first_welcome": min(done, default=None), "last_welcome": max(done, default=None),
                "join_ms": hist.dump(), "per_s": sorted(per_s.items()), "cpu_s": round(_cpu() - cpu0, 3),
                "attempts": sum(v.attempts for v in self.viewers), "pid": os.getpid()}

    def _progress(self, t0: float, started: int) -> None:
        """A line every 5 s while joining (stderr): where a slow storm is."""
        now = time.time()
        if now >= self.said + 5:
            self.said = now
            print(f"[viewers {self.source}] +{now - t0:.0f}s started {started}, joined {self.joined}, "
                  f"in flight {self.outstanding}, failed {sum(self.failed.values())}", file=sys.stderr, flush=True)

    def _start(self, loop: asyncio.AbstractEventLoop, v: Viewer) -> None:
        self.outstanding += 1
        v.attempts += 1
        v.started = time.time()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            # Bound to this process's source address with no port yet: the kernel picks the port
            # at connect, by the whole address pair. A bind to port 0 scanned the ephemeral ports
            # in use each time: 97% of a viewer process's CPU by 6,000 sockets.
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((v.source, 0))
            err = sock.connect_ex((self.host, self.port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        except OSError as exc:
            sock.close()
            self._retry(loop, v, f"{type(exc).__name__}: {exc.strerror or exc}"[:80])
            return
        v.sock = sock
        fd = sock.fileno()
        self.by_fd[fd] = v
        # Writable once connected: then the handshake goes out and the socket waits to read.
        self.epoll.register(fd, EPOLLOUT)

    def _poll(self) -> None:
        """The epoll set is readable: every ready socket's connect, bytes or end."""
        by_fd = self.by_fd
        noop = self.frames.noop
        for fd, ev in self.epoll.poll(0):
            v = by_fd.get(fd)
            if v is None or v.sock is None:
                continue
            sock = v.sock
            if ev & EPOLLOUT:  # only a connecting socket waits to write
                if ev & EPOLL_FAILED:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    self.drop(v, f"OSError: {os.strerror(err) if err else 'connect failed'}"[:80])
                    continue
                self.epoll.modify(fd, EPOLLIN)
                try:
                    sock.send(v.request)
                except OSError as exc:
                    self.drop(v, f"{type(exc).__name__}: {exc.strerror or exc}"[:80])
                continue
            try:
                data = sock.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data in noop and v.open and not v.buf:
                continue  # exactly one frame that carries no gift: nothing to count
            if data:
                v.data_received(data)
            else:
                self.drop(v)

    def drop(self, v: Viewer, why: str | None = None) -> None:
        """Closes a viewer's socket; then as its end (or, with `why`, its connect's failure)."""
        sock, v.sock = v.sock, None
        if sock is None:
            return
        self.by_fd.pop(sock.fileno(), None)
        with contextlib.suppress(OSError):
            self.epoll.unregister(sock)
        sock.close()
        if why is not None:
            self._retry(asyncio.get_running_loop(), v, why)
            return
        v.closed = True
        self.lost(v)

    def _retry(self, loop: asyncio.AbstractEventLoop, v: Viewer, why: str) -> None:
        self.outstanding -= 1
        if v.attempts > RETRIES:
            self.failed[why] += 1
            return
        v.open, v.buf, v.closed, v.close_code = False, b"", False, None
        loop.call_later(0.5 * v.attempts, self._start, loop, v)

    def welcomed(self, v: Viewer) -> None:
        self.outstanding -= 1
        self.joined += 1

    def refused(self, v: Viewer, status: str) -> None:
        self.drop(v, status[:80])

    def lost(self, v: Viewer) -> None:
        if v.joined_at > 0:
            self.closes[str(v.close_code)] += 1
        elif v.joined_at == 0:
            # Closed before its welcome (a refusal's close code, or the connection dropped).
            self._retry(asyncio.get_running_loop(), v, f"closed before welcome ({v.close_code})")

    # deliveries ------------------------------------------------------------------------------

    async def wait_for(self, gifts: int, checksum: int, wait_s: float) -> dict[str, Any]:
        live = [v for v in self.viewers if v.joined_at > 0]
        deadline = time.time() + wait_s
        last, moved = -1, time.time()
        while time.time() < deadline:
            if all(v.gifts >= gifts or v.closed for v in live):
                break
            total = sum(v.gifts for v in live)
            if total != last:
                last, moved = total, time.time()
            elif time.time() - moved > QUIET_S:
                break
            await asyncio.sleep(0.2)
        return self.figures(live, gifts, checksum)

    def figures(self, live: list[Viewer], gifts: int, checksum: int) -> dict[str, Any]:
        want = checksum % CHECKSUM_MOD
        exact = sum(1 for v in live if v.gifts == gifts and v.checksum % CHECKSUM_MOD == want and not v.overlaps)
        short = [v for v in live if v.gifts < gifts]
        frames = self.frames
        latency, spread = Hist(), Hist()
        for idx, times in enumerate(frames.arrivals):
            if not times or not frames.ts[idx]:
                continue
            got = np.frombuffer(times, dtype=np.float64) if np is not None else None
            if got is not None:
                for ts in frames.ts[idx]:
                    latency.add_many((got - ts / 1000) * 1000)
                spread.add((float(got.max()) - float(got.min())) * 1000)
            else:
                for ts in frames.ts[idx]:
                    for t in times:
                        latency.add((t - ts / 1000) * 1000)
                spread.add((max(times) - min(times)) * 1000)
        return {"sockets": len(live), "exact": exact, "short": len(short),
                "missing_events": sum(gifts - v.gifts for v in short),
                "extra_events": sum(max(0, v.gifts - gifts) for v in live),
                "overlapping_frames": sum(v.overlaps for v in live),
                "closed": sum(1 for v in live if v.closed), "closes": dict(self.closes),
                "deliveries": sum(v.gifts for v in live), "latency_ms": latency.dump(),
                "frame_spread_ms": spread.dump(),
                "frames": sum(1 for i, c in enumerate(frames.count) if c and frames.arrivals[i]),
                "frame_bytes": [len(raw) for raw in frames.index][:50]}

    async def run(self) -> None:
        self.pipe.send(("ready", {"pid": os.getpid(), "count": len(self.viewers)}))
        _, t0 = await self._recv()
        joined = await self.join_all(t0)
        # Everything the join made lives to the end; a full collection walking 15,000 sockets'
        # objects would put its own pauses into the latencies measured next.
        gc.collect()
        gc.freeze()
        gc.disable()
        self.pipe.send(("joined", joined))
        msg = await self._recv()
        if msg[0] == "expect":  # a storm with gifts: their deliveries, then the close
            _, gifts, checksum, wait_s = msg
            self.pipe.send(("delivered", await self.wait_for(gifts, checksum, wait_s)))
            await self._recv()
        asyncio.get_running_loop().remove_reader(self.epoll.fileno())
        for v in self.viewers:
            if v.sock is not None:
                v.sock.close()
        self.epoll.close()
        await asyncio.sleep(0.2)

    async def _recv(self) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, self.pipe.recv)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pool_main(spec: dict[str, Any], pipe: Connection) -> None:
    from loadtests.target import raise_fd_limit

    raise_fd_limit()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    out = os.environ.get("GIFTSTREAM_VIEWERS_PROFILE")
    if not out:
        asyncio.run(Pool(spec, pipe).run())
        return
    # A profile of this process (a directory: one file a process), to see where a join's CPU goes.
    import cProfile

    with cProfile.Profile() as prof:
        asyncio.run(Pool(spec, pipe).run())
    prof.dump_stats(os.path.join(out, f"viewers-{os.getpid()}.prof"))
