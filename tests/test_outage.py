"""A 10-second database outage during a gift storm: gifts keep being acknowledged, the
settler backs off, /healthz says degraded with the lag, and everything settles after."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.support import FAST, Api, ServerProc, TcpProxy, join, run_cli, token, wait_until


async def test_database_outage_during_storm(make_server: Callable[..., ServerProc], redis_url: str,
                                            pg_database_url: str, tmp_path: Path) -> None:
    database_url = pg_database_url  # SQLite is a file in the data dir: an outage is a server database's
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    proxied = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    try:
        server = make_server(redis_url=redis_url, database_url=proxied, env=FAST).start()
        host = Api(server, token("oh", "host"))
        room = await host.create_room()
        senders = [f"os{i}" for i in range(3)]
        for s in senders:
            api = Api(server, token(s))
            assert (await api.recharge(coins=10_000)).status_code == 201
            await api.close()
        acked: list[str] = []
        during: list[str] = []
        outage = {"on": False}

        async def storm(sender: str) -> None:
            async with join(server, room, token(sender)) as c:
                for i in range(1500):
                    gid = f"{sender}-{i}"
                    await c.gift(gid)
                    reply = await c.reply(gid)
                    assert reply["type"] == "ack", reply
                    acked.append(gid)
                    if outage["on"]:
                        during.append(gid)
                    await asyncio.sleep(0.004)  # pacing: the storm spans the whole outage

        tasks = [asyncio.create_task(storm(s)) for s in senders]
        await wait_until(lambda: len(acked) > 300, timeout=30, interval=0.02)
        proxy.cut()
        outage["on"] = True
        started = time.monotonic()
        health_seen = None
        while time.monotonic() - started < 10:  # the outage lasts 10 s: the window is what is tested
            r = await host.client.get("/healthz")
            if r.status_code == 503:
                health_seen = r.json()
            await asyncio.sleep(0.5)  # a health probe's period, as a load balancer's
        assert health_seen is not None, "healthz must report the outage"
        assert health_seen["status"] == "degraded" and health_seen["database"] != "ok"
        assert health_seen["outbox_entries"] > 0 and health_seen["outbox_lag_ms"] > 1000
        proxy.restore()
        outage["on"] = False
        await asyncio.gather(*tasks)
        assert len(during) > 100, "gifts must keep being acknowledged while the database is down"

        async def all_settled() -> bool:
            r = await host.client.get("/v1/me/earnings")
            return r.status_code == 200 and r.json()["gifts_received"] == 4500

        await wait_until(all_settled, timeout=60, interval=0.5)
        assert (await host.client.get("/healthz")).status_code == 200
        result = run_cli("audit", "--json", "--redis-url", redis_url, "--database-url", database_url,
                         "--data-dir", str(tmp_path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["diamonds"]["gifts"] == 4500
        await host.close()
    finally:
        proxy.close()
