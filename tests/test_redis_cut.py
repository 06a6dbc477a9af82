"""Redis cut for 2 s in the middle of a gift storm, then restored: nothing crashes, every gift
is charged exactly once under its client id, the HTTP API answers 503 `unavailable` while
Redis is away, and the node recovers by itself (settlement, room events, HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio
import websockets

from server.codes import Close
from server.keys import PREFIX, SETTLER_GROUP
from tests.support import FAST, Api, Client, ServerProc, TcpProxy, join, run_cli, token, wait_until

SENDERS = 3
COINS = 1000
GIFTS = 400
WINDOW = 50
CUT_S = 2.0
# Codes a gift may get while Redis is away; both mean "retry with the same id".
RETRYABLE = {"unavailable", "rate_limited"}


class Sender:
    """One user's storm: windows of outstanding gifts, each resent with its id until acked."""

    def __init__(self, server: ServerProc, room: str, user_id: str) -> None:
        self.server, self.room, self.user_id = server, room, user_id
        self.gift_ids: dict[str, set[str]] = {}
        self.errors: list[str] = []
        # Gifts charged for the first time (not replays), with when their ack arrived.
        self.fresh: list[tuple[float, str]] = []

    def note(self, reply: dict[str, Any]) -> bool:
        if reply["type"] == "ack":
            self.gift_ids.setdefault(reply["id"], set()).add(reply["gift_id"])
            if not reply["replayed"]:
                self.fresh.append((time.monotonic(), reply["gift_id"]))
            return True
        self.errors.append(reply["code"])
        return False

    async def storm(self, acked: list[str]) -> None:
        pending = [f"{self.user_id}-{i}" for i in range(GIFTS)]
        async with contextlib.AsyncExitStack() as stack:
            client: Client | None = None
            while pending:
                window, done = pending[:WINDOW], set()
                try:
                    if client is None:
                        client = await stack.enter_async_context(join(self.server, self.room, token(self.user_id)))
                    for gid in window:
                        client.replies.pop(gid, None)
                        await client.gift(gid)
                    for gid in window:
                        if self.note(await client.reply(gid, timeout=5)):
                            done.add(gid)
                except (TimeoutError, OSError, websockets.ConnectionClosed):
                    # A reply that never came is an unknown outcome: resend with the same id.
                    await stack.aclose()
                    client = None
                    await asyncio.sleep(0.1)  # a client's pause before it reconnects
                acked.extend(done)
                pending = [gid for gid in pending if gid not in done]
                if len(done) < len(window):
                    await asyncio.sleep(0.1)  # a client's pause before it retries what was refused


async def _lose_a_read(redis_url: str, consumer: str) -> int:
    """XREADGROUP outbox entries as `consumer`, straight from valkey, and drop the reply."""
    direct = redis.asyncio.Redis.from_url(redis_url)
    try:
        streams: dict[Any, Any] = dict.fromkeys(await direct.keys(f"{PREFIX}:*:outbox"), ">")
        lost = 0

        async def read_some() -> bool:
            nonlocal lost
            read: Any = await direct.xreadgroup(SETTLER_GROUP, consumer, streams)
            lost = sum(len(messages) for _stream, messages in read)
            return lost > 0

        await wait_until(read_some, timeout=5, interval=0.001, message="no outbox entry to read during the storm")
        return lost
    finally:
        await direct.aclose()


@pytest.mark.timeout(60)
async def test_redis_cut_during_storm(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    upstream = urlsplit(redis_url)
    proxy = TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 6379)
    server: ServerProc | None = None
    try:
        server = make_server(redis_url=f"redis://127.0.0.1:{proxy.port}/0", env=FAST).start()
        host = Api(server, token("ch", "host"))
        room = await host.create_room()
        senders = [Sender(server, room, f"cs{i}") for i in range(SENDERS)]
        wallets = [Api(server, token(s.user_id)) for s in senders]
        for w in wallets:
            assert (await w.recharge(coins=COINS)).status_code == 201
        async with join(server, room, token("cv")) as viewer:
            acked: list[str] = []
            tasks = [asyncio.create_task(s.storm(acked)) for s in senders]
            await wait_until(lambda: len(acked) >= 300, timeout=20, interval=0.01)

            # The cut takes the reply of a settler's read with it: the entries are pending to the
            # settler, which never saw them.
            await _lose_a_read(redis_url, f"{socket.gethostname()}:{server.port}")
            proxy.cut()
            cut_until = time.monotonic() + CUT_S
            # A viewer joining now is told to come back later, with a documented close code.
            with pytest.raises(websockets.ConnectionClosed) as refused:
                async with join(server, room, token("cl")):
                    pass
            statuses: list[tuple[int, Any]] = []
            while time.monotonic() < cut_until:  # the cut lasts CUT_S: the window is what is tested
                r = await wallets[0].client.get("/v1/wallet")
                statuses.append((r.status_code, r.json()))
                await asyncio.sleep(0.2)  # a few requests over the window, not a flood
            proxy.restore()
            restored = time.monotonic()
            # The first requests after the restore find the connections pooled before the cut dead.
            for w in wallets:
                r = await w.client.get("/v1/wallet")
                assert r.status_code == 200, (r.status_code, r.text)

            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            # Room events flow again: every gift charged after the restore reaches the viewer.
            after = {gift_id for s in senders for at, gift_id in s.fresh if at > restored}
            assert after, "the storm must go on after the restore"

            await viewer.until(lambda: after <= {e["gift_id"] for e in viewer.events if e["type"] == "gift"})
            shown = [e["gift_id"] for e in viewer.events if e["type"] == "gift"]
            assert len(shown) == len(set(shown)), "the catch-up after the restore showed a gift twice"

        assert refused.value.rcvd is not None and refused.value.rcvd.code == Close.TRY_AGAIN_LATER, refused.value
        assert statuses and all(code == 503 for code, _ in statuses), statuses
        assert {body["code"] for _, body in statuses} == {"unavailable"}, statuses
        errors = [code for s in senders for code in s.errors]
        assert errors, "gifts sent while Redis was cut must get an error reply"
        assert set(errors) <= RETRYABLE, errors
        for s in senders:
            assert len(s.gift_ids) == GIFTS
            assert all(len(ids) == 1 for ids in s.gift_ids.values()), "a retry got a different gift_id"
        assert len({i for s in senders for ids in s.gift_ids.values() for i in ids}) == SENDERS * GIFTS
        for w in wallets:
            assert (await w.wallet())["coins"] == COINS - GIFTS

        async def all_settled() -> bool:
            r = await host.client.get("/v1/me/earnings")
            return r.status_code == 200 and r.json()["gifts_received"] == SENDERS * GIFTS

        # Also what the cut left pending to the settler, without waiting for XAUTOCLAIM (30 s idle).
        await wait_until(all_settled, timeout=10, interval=0.2)
        assert (await host.client.get("/healthz")).status_code == 200
        for client in (host, *wallets):
            await client.close()
        # Shutting down while Redis is away again: the node stops cleanly (whatever it could not
        # settle would wait in the outbox for the next start).
        proxy.cut()
        assert server.terminate(timeout=15) in (0, -signal.SIGTERM)
        log = server.log.read_text()
        assert "Application shutdown failed" not in log and "Traceback" not in log, log[-3000:]
        result = run_cli("audit", "--json", "--redis-url", redis_url, "--data-dir", str(server.data_dir))
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["diamonds"]["gifts"] == SENDERS * GIFTS
    finally:
        if server is not None and server.running():
            server.terminate(timeout=15)  # before the proxy goes: it is the server's Redis
        proxy.close()


@pytest.mark.timeout(60)
async def test_a_quiet_room_gets_the_gifts_sent_while_its_node_lost_redis(
        make_server: Callable[..., ServerProc], redis_url: str) -> None:
    """A viewer that has had no event yet, on a node whose Redis connections drop: gifts sent
    through another node meanwhile reach it once the node's room bus is back (the catch-up starts
    from the offset the viewer joined at, there being no event seen to start from)."""
    upstream = urlsplit(redis_url)
    proxy = TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 6379)
    cut_node: ServerProc | None = None
    try:
        cut_node = make_server(redis_url=f"redis://127.0.0.1:{proxy.port}/0", env=FAST).start()
        other = make_server(redis_url=redis_url, env=FAST).start()
        room = await Api(other, token("qh", "host")).create_room()
        sender = Api(other, token("qs"))
        assert (await sender.recharge(coins=100)).status_code == 201
        async with join(cut_node, room, token("qv")) as viewer, join(other, room, token("qs")) as gifter:
            proxy.cut()

            async def redis_away() -> bool:
                return (await sender.client.get(f"{cut_node.base}/healthz")).status_code == 503

            await wait_until(redis_away, timeout=10)
            for i in range(5):
                await gifter.gift(f"q{i}")
            acks = [await gifter.reply(f"q{i}") for i in range(5)]
            assert all(a["type"] == "ack" for a in acks), acks
            proxy.restore()
            want = {a["gift_id"] for a in acks}

            await viewer.until(lambda: want <= {e.get("gift_id") for e in viewer.events}, timeout=20)
            await viewer.drain(0.5)
            got = [e["gift_id"] for e in viewer.events if e["type"] == "gift"]
            assert sorted(got) == sorted(want), got  # each once
    finally:
        if cut_node is not None:
            cut_node.terminate(timeout=15)
        proxy.close()
