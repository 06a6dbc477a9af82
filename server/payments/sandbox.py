"""The built-in sandbox provider: the payment network played locally.

Charging: `sandbox_card` pays at once; `sandbox_card_declined` is always refused; `card`,
`paypal`, `mobile_wallet` and `bank_transfer` (web) and `app_store`, `play_store` (their own
channels) start a payment whose outcome comes later by webhook. Card numbers behave like the
well-known test cards: ending 0002 declined (`card_declined`), ending 9995 declined
(`insufficient_funds`), anything else goes on.

Playing the network: `event` builds the webhook event for an outcome, and `deliver` POSTs it
signed to a webhook URL, as often as asked and all at once, as real providers redeliver.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from typing import Any

import httpx

from server.payments import signature
from server.payments.base import DECLINED, PAID, PENDING, ChargeResult
from server.payments.orders import Outcome
from server.store.models import Order

WEB, APP_STORE, PLAY_STORE = "web", "app_store", "play_store"
# Test card numbers, by their last four digits.
TEST_CARDS = {"0002": "card_declined", "9995": "insufficient_funds"}
# outcome -> (event type, data.status)
EVENT_TYPES: dict[Outcome, tuple[str, str | None]] = {
    Outcome.SUCCEEDED: ("payment.succeeded", None),
    Outcome.DECLINED: ("payment.declined", None),
    Outcome.EXPIRED: ("payment.expired", None),
    Outcome.REFUNDED: ("charge.refunded", None),
    Outcome.DISPUTED: ("charge.dispute.created", None),
    Outcome.DISPUTE_WON: ("charge.dispute.closed", "won"),
    Outcome.DISPUTE_LOST: ("charge.dispute.closed", "lost"),
}


class SandboxProvider:
    name = "sandbox"
    card_methods = frozenset({"sandbox_card", "card"})
    instant = frozenset({"sandbox_card", "sandbox_card_declined"})

    def __init__(self) -> None:
        self.methods: dict[str, tuple[str, ...]] = {
            "sandbox_card": (WEB,), "sandbox_card_declined": (WEB,),
            "card": (WEB,), "paypal": (WEB,), "mobile_wallet": (WEB,), "bank_transfer": (WEB,),
            "app_store": (APP_STORE,), "play_store": (PLAY_STORE,),
        }

    def payment_id(self, order_id: str) -> str:
        return "pay_" + hashlib.sha256(order_id.encode()).hexdigest()[:24]

    async def charge(self, order: Order, card_number: str | None) -> ChargeResult:
        if order.payment_method == "sandbox_card_declined":
            return ChargeResult(DECLINED, "card_declined")
        reason = TEST_CARDS.get((card_number or "")[-4:])
        if reason is not None:
            return ChargeResult(DECLINED, reason)
        return ChargeResult(PAID if order.payment_method in self.instant else PENDING)


def event(order: Order, outcome: Outcome, reason: str | None = None) -> dict[str, Any]:
    """The webhook event the network sends for `outcome` on the order's payment."""
    kind, status = EVENT_TYPES[outcome]
    data: dict[str, Any] = {"payment_id": order.payment_id, "amount_cents": order.price_cents,
                            "currency": order.currency}
    if outcome is Outcome.DECLINED:
        data["reason"] = reason or "card_declined"
    elif reason:
        data["reason"] = reason
    if status is not None:
        data["status"] = status
    return {"id": "evt_" + uuid.uuid4().hex, "type": kind, "created": int(time.time()), "data": data}


async def deliver(url: str, secret: str, body: dict[str, Any], deliveries: int) -> list[dict[str, Any]]:
    """POST the signed event `deliveries` times at once, each on a connection of its own; the
    answers, in order: {"status", "body"} (status 0 and the error when no answer came)."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    headers = {"content-type": "application/json",
               "giftstream-signature": signature.sign(secret, raw, int(time.time()))}

    async def one() -> dict[str, Any]:
        # A client per delivery: concurrent deliveries race on separate connections, as a
        # provider's redeliveries from several machines do.
        # trust_env=False: a proxy set for the machine's outbound traffic must not carry these.
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            try:
                r = await client.post(url, content=raw, headers=headers)
            except httpx.HTTPError as exc:
                return {"status": 0, "body": {"error": type(exc).__name__}}
        try:
            answer = r.json()
        except ValueError:
            answer = {"text": r.text[:200]}
        return {"status": r.status_code, "body": answer}

    return list(await asyncio.gather(*(one() for _ in range(deliveries))))
