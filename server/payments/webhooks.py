"""The provider's webhook, top to bottom: verify, parse, find the order, check the money, apply.

    POST /v1/payments/sandbox/webhook
    Giftstream-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">
    {"id": "evt_...", "type": ..., "created": <unix s>,
     "data": {"payment_id", "amount_cents", "currency", "reason"?, "status"?}}

Nothing changes unless the signature is good and fresh (400 bad_signature), the event is well
formed (400 bad_request), its payment is known (404) and its amount and currency are the
order's (400 amount_mismatch, logged). Then the event is applied once, keyed by its id: a
delivery seen before answers `{"duplicate": true}` (and makes any coin movement a crash left
to do, which is why a provider's redelivery heals a half-applied event).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from server.codes import Err, GiftstreamError
from server.payments import signature
from server.payments.orders import Outcome
from server.payments.recharges import Recharges
from server.store.models import PaymentEvent, now_ms

log = logging.getLogger("giftstream.payments")

# event type -> outcome; charge.dispute.closed says won or lost in data.status.
OUTCOMES = {
    "payment.succeeded": Outcome.SUCCEEDED,
    "payment.declined": Outcome.DECLINED,
    "payment.expired": Outcome.EXPIRED,
    "charge.refunded": Outcome.REFUNDED,
    "charge.dispute.created": Outcome.DISPUTED,
}
DISPUTE_CLOSED = "charge.dispute.closed"
CLOSED = {"won": Outcome.DISPUTE_WON, "lost": Outcome.DISPUTE_LOST}
# Webhook bodies are a few hundred bytes; the signature is checked before any parsing.
MAX_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    outcome: Outcome
    payment_id: str
    amount_cents: int
    currency: str
    reason: str | None


class Webhooks:
    def __init__(self, recharges: Recharges, secret: str | None, provider: str = "sandbox") -> None:
        self.recharges = recharges
        self.secret = secret
        self.provider = provider

    async def receive(self, raw: bytes, header: str | None) -> dict[str, Any]:
        verify(self.secret, raw, header)
        event = parse(raw)
        order = await self.recharges.store.order_by_payment(event.payment_id)
        if order is None:
            raise GiftstreamError(Err.NOT_FOUND, "no such payment")
        if (event.amount_cents, event.currency) != (order.price_cents, order.currency):
            log.warning("webhook %s for payment %s: %s %s, but order %s is %s %s; nothing applied", event.id,
                        event.payment_id, event.amount_cents, event.currency, order.id, order.price_cents,
                        order.currency)
            raise GiftstreamError(Err.AMOUNT_MISMATCH,
                                  f"the event's amount or currency is not the order's ({order.price_cents} "
                                  f"{order.currency})")
        record = PaymentEvent(event.id, self.provider, event.type, event.payment_id, order.id, now_ms(),
                              raw.decode())
        applied = await self.recharges.apply(order, event.outcome, event.reason, record)
        if applied.duplicate:
            return {"duplicate": True}
        return {"duplicate": False, "applied": bool(applied.new), "order_id": order.id,
                "status": applied.order.status}


def verify(secret: str | None, raw: bytes, header: str | None) -> None:
    """400 bad_signature unless `header` signs `raw` with `secret`, fresh (every webhook of ours)."""
    try:
        if not secret:  # settings.resolve_secret always sets one; never verify against ""
            raise signature.BadSignature("no webhook secret is configured")
        signature.verify(secret, header, raw, time.time())
    except signature.BadSignature as exc:
        raise GiftstreamError(Err.BAD_SIGNATURE, str(exc)) from None


def parse(raw: bytes) -> Event:
    """A well-formed event, or 400 bad_request saying what is wrong."""
    event_id, kind, data = envelope(raw)
    if kind == DISPUTE_CLOSED:
        status = data.get("status")
        outcome = CLOSED.get(status) if isinstance(status, str) else None
        if outcome is None:
            raise GiftstreamError(Err.BAD_REQUEST, "a closed dispute's data.status is won or lost")
    elif kind in OUTCOMES:
        outcome = OUTCOMES[kind]
    else:
        raise GiftstreamError(Err.BAD_REQUEST, f"type must be one of {', '.join([*OUTCOMES, DISPUTE_CLOSED])}")
    payment_id, amount, currency, reason = money(data, "payment_id", "card_declined")
    return Event(event_id, kind, outcome, payment_id, amount, currency, reason)


def envelope(raw: bytes) -> tuple[str, Any, dict[str, Any]]:
    """(id, type, data) of an event of any of our providers (payments, payouts), its type not yet
    checked; 400 bad_request saying what is wrong."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise GiftstreamError(Err.BAD_REQUEST, "body must be JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise GiftstreamError(Err.BAD_REQUEST, "an event is an object with id, type, created and data")
    event_id = body.get("id")
    if not _text(event_id, 255):
        raise GiftstreamError(Err.BAD_REQUEST, "id must be a string of 1 to 255 printable characters")
    if not isinstance(body.get("created"), int):
        raise GiftstreamError(Err.BAD_REQUEST, "created must be unix seconds")
    assert isinstance(event_id, str)
    return event_id, body.get("type"), body["data"]


def money(data: dict[str, Any], id_field: str, reason_example: str) -> tuple[str, int, str, str | None]:
    """(the id in `id_field`, amount_cents, currency, reason) of an event's data, or 400."""
    target, amount, currency, reason = (data.get(id_field), data.get("amount_cents"), data.get("currency"),
                                        data.get("reason"))
    if not _text(target, 128) or not _text(currency, 8):
        raise GiftstreamError(Err.BAD_REQUEST, f"data needs {id_field} and currency strings")
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise GiftstreamError(Err.BAD_REQUEST, "data.amount_cents must be a whole number of cents")
    if reason is not None and not (_text(reason, 64) and reason.replace("_", "").isalnum()):
        raise GiftstreamError(Err.BAD_REQUEST, f"data.reason must be a short code such as {reason_example}")
    assert isinstance(target, str) and isinstance(currency, str)
    return target, amount, currency, reason


def _text(value: Any, most: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= most and value.isprintable()
