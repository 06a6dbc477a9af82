"""The client library (client_demo/client.py) against real `giftstream serve` processes: gifts
with idempotent retries, reconnects that honour the close advice, resume with each event once,
and a bounded number of tries that names the URL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from client_demo._wire import JSON, MSGPACK
from client_demo.client import CannotConnect, GiftRefused, GiftUnanswered, RoomClient, RoomClosed
from client_demo.state import GIFT_MAX_AGE_S, Backoff, CloseAdvice, Feed, PendingGifts
from server.settings import Settings
from tests.support import FAST, Api, ServerProc, TcpProxy, free_port, token, wait_until

pytestmark = pytest.mark.timeout(120)


class Collector:
    """Reads a client's feed into a list on its own task."""

    def __init__(self, client: RoomClient) -> None:
        self.items: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.error: BaseException | None = None
        self.task = asyncio.get_running_loop().create_task(self._read(client))

    async def _read(self, client: RoomClient) -> None:
        try:
            async for item in client.feed():
                self.items.append(item)
                self.times.append(time.monotonic())
        except Exception as exc:
            self.error = exc

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [i for i in self.items if i.get("type") == kind]

    def gift_ids(self) -> list[str]:
        return [e["gift_id"] for e in self.of("gift")]

    async def wait(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        await wait_until(condition, timeout=timeout, interval=0.02,
                         message=lambda: f"feed so far: {self.items} (error {self.error!r})")

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def room_and_viewer(api: Callable[..., Api], coins: int = 100) -> tuple[str, Api]:
    room = await api("hana", "host", name="Hana").create_room()
    viewer = api("vic", name="Vic")
    assert (await viewer.recharge(coins=coins)).status_code == 201
    return room, viewer


# --- the pure parts ------------------------------------------------------------------------


def test_close_advice_reads_json_plain_text_and_no_frame() -> None:
    advice = CloseAdvice.parse(1001, '{"reason":"server restarting","reconnect":true,"retry_ms":2718}')
    assert advice == CloseAdvice(1001, "server restarting", True, 2718)
    assert CloseAdvice.parse(4401, '{"reason":"invalid token","reconnect":false}').reconnect is False
    assert CloseAdvice.parse(1011, "keepalive ping timeout") == CloseAdvice(1011, "keepalive ping timeout", True)
    assert CloseAdvice.parse(1009, "").reconnect is False
    assert CloseAdvice.parse(None, None) == CloseAdvice(1006, "connection lost", True)
    assert CloseAdvice.parse(1001, '{"reconnect":true,"retry_ms":-5}').retry_ms is None


def test_backoff_takes_the_advised_delay_and_doubles_its_own() -> None:
    backoff = Backoff(first=1.0, cap=4.0)
    assert backoff.next(advised_ms=2718) == 2.718
    delays = [backoff.next() for _ in range(4)]
    assert 1.6 <= delays[0] <= 2.4 and 3.2 <= delays[1] <= 4.8 and all(d <= 4.8 for d in delays)
    assert backoff.failures == 5
    backoff.reset()
    assert backoff.failures == 0 and 0.8 <= backoff.next() <= 1.2


def test_feed_hands_each_stored_event_on_once_across_a_resume() -> None:
    feed = Feed()
    assert feed.resume_frame({"offset": "5-0", "epoch": "e1"}) is None
    assert [feed.accept({"offset": o}) for o in ("6-0", "7-0")] == [True, True]
    assert feed.offset == "7-0"
    # Reconnected: the room is at 9-0; the replay repeats 7-0, live 9-0 runs ahead of 8-0.
    assert feed.resume_frame({"offset": "9-0", "epoch": "e1"}) == {"type": "resume", "since": "7-0", "epoch": "e1"}
    assert [feed.accept({"offset": o}) for o in ("7-0", "8-0", "9-0", "9-0")] == [False, True, True, False]
    assert feed.accept({"type": "presence"}) is True
    assert feed.offset == "9-0"


def test_pending_gifts_retry_only_what_the_server_says_is_retryable() -> None:
    gifts = PendingGifts(max_tries=2)
    frame = gifts.add("g1", "rose", 2)
    assert frame == {"type": "gift", "id": "g1", "gift": "rose", "count": 2}
    gifts.add("g2", "rose", 1)
    retry = gifts.answer({"type": "error", "id": "g1", "code": "unavailable"})
    assert retry is not None and retry.outcome == "retry" and gifts.unanswered()[0] is frame
    refused = gifts.answer({"type": "error", "id": "g1", "code": "rate_limited"})
    assert refused is not None and refused.outcome == "refused"  # out of tries
    final = gifts.answer({"type": "error", "id": "g2", "code": "insufficient_funds"})
    assert final is not None and final.outcome == "refused" and gifts.unanswered() == []
    assert gifts.answer({"type": "ack", "id": "stranger"}) is None


def test_pending_gifts_are_not_resent_past_their_age_so_an_expired_id_is_never_charged_twice() -> None:
    # The server remembers a charged id for idempotency_ttl_s; the client stops resending well before.
    assert Settings.idempotency_ttl_s >= GIFT_MAX_AGE_S * 2
    now = [1000.0]
    gifts = PendingGifts(clock=lambda: now[0])
    gifts.add("g1", "rose", 1)
    now[0] += GIFT_MAX_AGE_S / 2
    gifts.add("g2", "rose", 1)
    assert gifts.expire() == [] and [f["id"] for f in gifts.unanswered()] == ["g1", "g2"]
    now[0] += GIFT_MAX_AGE_S / 2 + 1  # a suspended laptop wakes up: g1 is past its age, g2 not
    assert gifts.expire() == ["g1"] and [f["id"] for f in gifts.unanswered()] == ["g2"]
    assert gifts.answer({"type": "ack", "id": "g1"}) is None  # a late ack of it answers nothing


# --- against a real server -----------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", [MSGPACK, JSON])
async def test_gifts_are_acked_and_final_refusals_are_not_retried(
        server: ServerProc, api: Callable[..., Api], subprotocol: str) -> None:
    room, viewer = await room_and_viewer(api, coins=30)
    async with RoomClient(server.base, room, viewer.token, subprotocol=subprotocol) as client:
        assert client.welcome["you"] == {"id": "vic", "name": "Vic", "role": "viewer"}
        ack = await client.gift("rose", 3, gift_id="lib-1")
        assert ack["id"] == "lib-1" and ack["balance"] == 27 and ack["replayed"] is False
        again = await client.gift("rose", 3, gift_id="lib-1")
        assert again["replayed"] is True and again["gift_id"] == ack["gift_id"] and again["balance"] == 27
        with pytest.raises(GiftRefused) as poor:
            await client.gift("galaxy")
        assert poor.value.code == "insufficient_funds"
        with pytest.raises(GiftRefused) as unknown:
            await client.gift("unicorn")
        assert unknown.value.code == "unknown_gift"
        assert client.pending.unanswered() == []
    assert (await viewer.wallet())["coins"] == 27


async def test_rate_limited_gifts_are_retried_with_their_ids_and_charged_once(
        make_server: Callable[..., ServerProc], redis_url: str) -> None:
    server = make_server(redis_url=redis_url, env={"GIFTSTREAM_GIFT_RATE_PER_S": "4",
                                                   "GIFTSTREAM_GIFT_BURST": "2"}).start()
    host, viewer = Api(server, token("hana", "host")), Api(server, token("vic"))
    try:
        room = await host.create_room()
        assert (await viewer.recharge(coins=100)).status_code == 201
        async with RoomClient(server.base, room, viewer.token) as client:
            acks = await asyncio.gather(*(client.gift("rose", gift_id=f"burst-{i}") for i in range(8)))
        assert sorted(a["id"] for a in acks) == [f"burst-{i}" for i in range(8)]
        assert (await viewer.wallet())["coins"] == 92
        info = (await viewer.client.get(f"/v1/rooms/{room}")).json()
        assert info["gifts_total"] == 8 and info["coins_total"] == 8
    finally:
        await host.close()
        await viewer.close()


async def test_a_lost_ack_is_resent_with_the_same_id_and_charged_once(
        server: ServerProc, api: Callable[..., Api]) -> None:
    room, viewer = await room_and_viewer(api)
    async with RoomClient(server.base, room, viewer.token) as client:
        lost: list[str] = []

        def lose_first_ack(msg: dict[str, Any]) -> bool:
            if msg.get("type") == "ack" and not lost:
                lost.append(msg["id"])
                return True
            return False

        client.lose_reply = lose_first_ack
        feed = Collector(client)
        ack = await client.gift("panda", 2, gift_id="lost-1")
        assert lost == ["lost-1"] and ack["replayed"] is True and ack["balance"] == 90
        await feed.wait(lambda: bool(feed.of("resent")))
        assert feed.of("resent")[0]["ids"] == ["lost-1"]
        await feed.stop()
    assert (await viewer.wallet())["coins"] == 90
    info = (await viewer.client.get(f"/v1/rooms/{room}")).json()
    assert info["gifts_total"] == 1 and info["coins_total"] == 10


async def test_a_gift_unanswered_past_its_age_is_not_resent_after_a_reconnect(
        server: ServerProc, api: Callable[..., Api]) -> None:
    room, viewer = await room_and_viewer(api)
    async with RoomClient(server.base, room, viewer.token) as client:
        now = [time.time()]
        client.pending.clock = lambda: now[0]

        def lose_ack_and_sleep(msg: dict[str, Any]) -> bool:
            now[0] += GIFT_MAX_AGE_S + 1  # the socket drops, and the laptop sleeps past the age
            return True

        client.lose_reply = lose_ack_and_sleep
        feed = Collector(client)
        with pytest.raises(GiftUnanswered):
            await client.gift("panda", 2, gift_id="slept-1")
        await feed.wait(lambda: len(feed.of("connected")) == 2)
        assert not feed.of("resent") and client.pending.unanswered() == []
        await feed.stop()
    assert (await viewer.wallet())["coins"] == 90  # charged once, by the first send


async def test_gifts_during_a_server_restart_are_retried_and_charged_once(
        make_server: Callable[..., ServerProc], redis_url: str, tmp_path: Path) -> None:
    """SIGTERM closes the socket with 1001 and an advised retry_ms; gifts sent before, during
    and after the drain all end acknowledged, each charged once."""
    server = make_server(redis_url=redis_url, env=FAST).start()
    host, viewer = Api(server, token("hana", "host")), Api(server, token("vic"))
    try:
        room = await host.create_room()
        assert (await viewer.recharge(coins=1000)).status_code == 201
        async with RoomClient(server.base, room, viewer.token, max_tries=40) as client:
            feed = Collector(client)
            sends = [asyncio.ensure_future(client.gift("rose", gift_id=f"r-{i}")) for i in range(10)]
            stopping = asyncio.ensure_future(asyncio.to_thread(server.terminate))
            for i in range(10, 30):
                sends.append(asyncio.ensure_future(client.gift("rose", gift_id=f"r-{i}")))
                await asyncio.sleep(0.02)
            await stopping
            await feed.wait(lambda: any(d["code"] == 1001 for d in feed.of("disconnected")))
            await asyncio.to_thread(server.start)
            acks = await asyncio.gather(*sends)
            await feed.stop()
        assert sorted(a["id"] for a in acks) == sorted(f"r-{i}" for i in range(30))
        assert len({a["gift_id"] for a in acks}) == 30
        assert (await viewer.wallet())["coins"] == 970
        info = (await viewer.client.get(f"/v1/rooms/{room}")).json()
        assert info["gifts_total"] == 30 and info["coins_total"] == 30
    finally:
        await host.close()
        await viewer.close()


async def test_the_advised_retry_ms_is_waited(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    server = make_server(redis_url=redis_url).start()
    host = Api(server, token("hana", "host"))
    try:
        room = await host.create_room()
        client = RoomClient(server.base, room, token("vic"), max_tries=3)
        await client.start()
        feed = Collector(client)
        await asyncio.to_thread(server.terminate)
        await feed.wait(lambda: bool(feed.of("unreachable")) or feed.error is not None)
        disconnected = feed.of("disconnected")[0]
        assert disconnected["code"] == 1001 and disconnected["reason"] == "server restarting"
        assert 1000 <= disconnected["retry_ms"] <= 4999
        assert disconnected["wait_s"] == disconnected["retry_ms"] / 1000
        # The next try (refused: the server is down) came no sooner than advised.
        waited = feed.times[feed.items.index(feed.of("unreachable")[0])] - \
            feed.times[feed.items.index(disconnected)]
        assert waited >= disconnected["retry_ms"] / 1000 - 0.01
        await client.close()
        await feed.stop()
    finally:
        await host.close()


async def test_resume_after_a_drop_hands_each_event_on_once(
        server: ServerProc, api: Callable[..., Api]) -> None:
    room, viewer = await room_and_viewer(api)
    port = int(server.base.rsplit(":", 1)[1])
    proxy = TcpProxy("127.0.0.1", port)
    watcher = RoomClient(f"http://127.0.0.1:{proxy.port}", room, token("wendy", name="Wendy"), max_tries=40,
                         backoff_cap_s=0.5)
    try:
        await watcher.start()
        feed = Collector(watcher)
        async with RoomClient(server.base, room, viewer.token) as gifter:
            first = [await gifter.gift("rose", gift_id=f"a-{i}") for i in range(5)]
            await feed.wait(lambda: len(feed.of("gift")) == 5)
            proxy.cut()  # the watcher's network goes away
            await feed.wait(lambda: bool(feed.of("disconnected")))
            missed = [await gifter.gift("rose", gift_id=f"b-{i}") for i in range(5)]
            proxy.restore()
            await feed.wait(lambda: sum(c.get("resumed", False) for c in feed.of("connected")) >= 1)
            later = [await gifter.gift("rose", gift_id=f"c-{i}") for i in range(5)]
            await feed.wait(lambda: len(feed.of("gift")) >= 15)
        expected = [a["gift_id"] for a in first + missed + later]
        # Each gift once, in the room's order, though the network dropped in the middle.
        assert feed.gift_ids() == expected
        assert not feed.of("resume_failed")
        await feed.stop()
    finally:
        await watcher.close()
        proxy.close()


async def test_terminal_closes_end_the_client(server: ServerProc, api: Callable[..., Api]) -> None:
    host = api("hana", "host")
    room = await host.create_room()
    with pytest.raises(RoomClosed) as bad:
        await RoomClient(server.base, room, "not-a-token").start()
    assert bad.value.advice.code == 4401 and not bad.value.advice.reconnect
    with pytest.raises(RoomClosed) as missing:
        await RoomClient(server.base, "no-such-room", token("vic")).start()
    assert missing.value.advice.code == 4404

    async with RoomClient(server.base, room, token("vic")) as client:
        feed = Collector(client)
        assert (await host.client.post(f"/v1/rooms/{room}/end")).status_code == 200
        await feed.wait(lambda: feed.error is not None)
        assert isinstance(feed.error, RoomClosed) and feed.error.advice.code == 4410
        assert feed.of("room_ended")
        with pytest.raises(RoomClosed):
            await client.gift("rose")


async def test_an_unreachable_server_is_named_after_a_bounded_number_of_tries() -> None:
    port = free_port()
    client = RoomClient(f"http://127.0.0.1:{port}", "demo", token("vic"), max_tries=3, backoff_first_s=0.05)
    with pytest.raises(CannotConnect) as exc:
        await client.start()
    assert exc.value.tries == 3
    assert f"ws://127.0.0.1:{port}/v1/rooms/demo/ws" in str(exc.value)
    assert "token=..." in str(exc.value) and token("vic") not in str(exc.value)
