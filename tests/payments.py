"""Helpers of the payments tests: signed webhook deliveries over real HTTP, orders, audit."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx

from server.payments import signature
from tests.support import ServerProc, run_cli, token

WEBHOOK = "/v1/payments/sandbox/webhook"
WEBHOOK_SECRET = "whsec-test-0123456789"
ENV = {"GIFTSTREAM_WEBHOOK_SECRET": WEBHOOK_SECRET}


def event(payment_id: str, amount_cents: int, kind: str = "payment.succeeded", event_id: str | None = None,
          currency: str = "USD", **data: Any) -> dict[str, Any]:
    return {"id": event_id or "evt_" + os.urandom(8).hex(), "type": kind, "created": int(time.time()),
            "data": {"payment_id": payment_id, "amount_cents": amount_cents, "currency": currency, **data}}


def signed(body: dict[str, Any], secret: str = WEBHOOK_SECRET, t: int | None = None) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    return raw, {"content-type": "application/json",
                 "giftstream-signature": signature.sign(secret, raw, int(time.time()) if t is None else t)}


async def deliver(client: httpx.AsyncClient, body: dict[str, Any], **kw: Any) -> httpx.Response:
    raw, headers = signed(body, **kw)
    return await client.post(WEBHOOK, content=raw, headers=headers)


class Payer:
    """One user's HTTP client for recharges and orders."""

    def __init__(self, server: ServerProc, user_id: str, role: str = "viewer") -> None:
        self.user_id = user_id
        self.client = httpx.AsyncClient(base_url=server.base, timeout=60,
                                        headers={"authorization": f"Bearer {token(user_id, role)}"})

    async def close(self) -> None:
        await self.client.aclose()

    async def recharge(self, method: str = "card", package_id: str | None = "coins_330", key: str | None = None,
                       **extra: Any) -> httpx.Response:
        body: dict[str, Any] = {"payment_method": method, "idempotency_key": key or os.urandom(8).hex(), **extra}
        if package_id is not None and "coins" not in extra:
            body["package_id"] = package_id
        return await self.client.post("/v1/recharges", json=body)

    async def pending(self, **kw: Any) -> dict[str, Any]:
        r = await self.recharge(**kw)
        assert r.status_code == 202, r.text
        body: dict[str, Any] = r.json()
        assert body["status"] == "pending"
        return body

    async def order(self, order_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/recharges/{order_id}")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def coins(self) -> int:
        r = await self.client.get("/v1/wallet")
        assert r.status_code == 200, r.text
        return int(r.json()["coins"])

    async def drive(self, payment_id: str, outcome: str, deliveries: int = 1, **extra: Any) -> dict[str, Any]:
        """The sandbox network sends an outcome (this payer must be an admin)."""
        r = await self.client.post(f"/v1/sandbox/payments/{payment_id}",
                                   json={"outcome": outcome, "deliveries": deliveries, **extra})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


def audit(server: ServerProc) -> dict[str, Any]:
    """`giftstream audit --json` on the server's Redis and ledger; fails the test on a failure."""
    args = ["audit", "--json", "--data-dir", str(server.data_dir)]
    if server.redis_url:
        args += ["--redis-url", server.redis_url]
    if server.database_url:
        args += ["--database-url", server.database_url]
    result = run_cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]
