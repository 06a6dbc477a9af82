"""/metrics as operators scrape it: prometheus-client text, one worker or summed over several."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.support import FAST, Api, Client, ServerProc, join, token, wait_until

# Every name a dashboard read before /metrics was rendered by prometheus-client.
KEPT = ["giftstream_outbox_entries", "giftstream_outbox_lag_seconds", "giftstream_quarantined",
        "giftstream_settled_total", "giftstream_settle_batches_total", "giftstream_settle_failures_total",
        "giftstream_connections", "giftstream_rooms", "giftstream_room_events_total",
        "giftstream_room_frames_total", "giftstream_room_deliveries_total", "giftstream_debit_batches_total",
        "giftstream_debit_calls_total", "giftstream_bus_reconnects_total", "giftstream_keepalive_dropped_total",
        "giftstream_settler_degraded"]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(server: ServerProc) -> Samples:
    """One scrape on a fresh connection (under --workers N, any worker may answer)."""
    async with httpx.AsyncClient(base_url=server.base) as fresh:
        r = await fresh.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE_LATEST
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def _room_with_payer(server: ServerProc, host_id: str, payer: str, coins: int) -> str:
    host = Api(server, token(host_id, "host"))
    room = await host.create_room()
    await host.close()
    api = Api(server, token(payer))
    assert (await api.recharge(coins=coins)).status_code == 201
    await api.close()
    return room


async def _gift(client: Client, gift_id: str, gift: str = "rose") -> dict[str, object]:
    await client.gift(gift_id, gift)
    return await client.reply(gift_id)


async def test_metrics_show_acks_lua_batches_delivery_lag_and_refusals(server: ServerProc) -> None:
    room = await _room_with_payer(server, "mh", "mp", coins=100)
    async with join(server, room, token("mw")) as watcher, join(server, room, token("mp")) as payer:
        for i in range(3):
            assert (await _gift(payer, f"m{i}"))["type"] == "ack"
        assert (await _gift(payer, "big", "tiktok_universe"))["code"] == "insufficient_funds"
        await watcher.wait_events(3)

        async def counted() -> bool:
            s = await scrape(server)
            return (value(s, "giftstream_gift_ack_seconds_count") >= 4
                    and value(s, "giftstream_room_delivery_lag_seconds_count") >= 1
                    and value(s, "giftstream_reply_errors_total", code="insufficient_funds") == 1)

        await wait_until(counted, message="acks, delivery lag and the refusal counted")
        s = await scrape(server)
    assert value(s, "giftstream_lua_batch_calls_count") >= 1
    assert value(s, "giftstream_lua_batch_calls_sum") >= 4  # at least the four debits
    assert value(s, "giftstream_lua_batch_seconds_count") >= value(s, "giftstream_lua_batch_calls_count")
    assert value(s, "giftstream_debit_calls_total") == value(s, "giftstream_lua_batch_calls_sum")
    # The three gifts (plus the viewer counts) reached the watcher in at least one frame pass each.
    assert value(s, "giftstream_room_frames_total") >= value(s, "giftstream_room_delivery_lag_seconds_count") >= 1
    assert 0 < value(s, "giftstream_room_delivery_lag_seconds_sum") < 10
    assert value(s, "giftstream_connections") == 2 and value(s, "giftstream_rooms") == 1
    assert value(s, "giftstream_redis_up") == 1
    names = {name for name, _ in s}
    assert not [n for n in KEPT if n not in names], "every metric name of the hand-written /metrics is kept"


async def test_metrics_sum_every_worker(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    server = make_server(redis_url=redis_url, env=FAST, args=["--workers", "2"]).start()
    room = await _room_with_payer(server, "wh", "wp", coins=1000)

    async def per_worker() -> dict[str, int]:
        """Each worker's own socket count, from /healthz on fresh connections."""
        seen: dict[str, int] = {}
        for _ in range(40):
            async with httpx.AsyncClient(base_url=server.base) as fresh:
                health = (await fresh.get("/healthz")).json()
            seen[health["node"]] = health["connections"]
            if len(seen) == 2:
                break
        return seen

    async with contextlib.AsyncExitStack() as stack:
        socks: list[Client] = []
        # Each socket is its own connection, accepted by either worker: join until both have some.
        while len(socks) < 40:
            socks += [await stack.enter_async_context(join(server, room, token("wp"))) for _ in range(4)]
            counts = await per_worker()
            if len(counts) == 2 and all(counts.values()) and sum(counts.values()) == len(socks):
                break
        assert len(counts) == 2 and all(counts.values()), counts
        for i, sock in enumerate(socks):
            assert (await _gift(sock, f"w{i}"))["type"] == "ack"

        async def summed() -> bool:
            # Whichever worker answers, it reports both workers' sockets, joins and acks.
            s = await scrape(server)
            return (value(s, "giftstream_connections") == len(socks)
                    and value(s, "giftstream_join_seconds_count") == len(socks)
                    and value(s, "giftstream_gift_ack_seconds_count") == len(socks)
                    and value(s, "giftstream_debit_calls_total") >= len(socks))

        for _ in range(4):  # several scrapes, so both workers answer one
            await wait_until(summed, message="every worker's figures in one scrape")
    # Sockets closed: the figures written by each worker follow (within a second).

    async def closed() -> bool:
        return value(await scrape(server), "giftstream_connections") == 0

    await wait_until(closed, message="closed sockets leave the summed gauge")
