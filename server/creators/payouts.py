"""Payouts: the payout provider's webhook, and the sandbox network that plays the provider.

    POST /v1/payouts/sandbox/webhook
    Giftstream-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">
    {"id": "evt_...", "type": "payout.paid" | "payout.failed", "created": <unix s>,
     "data": {"withdrawal_id", "amount_cents", "currency", "reason"?}}

Signed as the payment webhooks are (payments/webhooks.py, the same secret). Nothing changes
unless the signature is good and fresh (400 bad_signature), the event is well formed (400
bad_request), its withdrawal is known (404) and its amount and currency are the withdrawal's
(400 amount_mismatch, logged). Then the event is applied once, keyed by its id (a delivery seen
before answers `{"duplicate": true}`), and moves a pending withdrawal on once: paid, its
reserved diamonds are paid out; failed, they are available again. A withdrawal past pending
stays as it is (a late `failed` after `paid` is recorded as ignored).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from server.codes import Err, GiftstreamError
from server.http_api import node_of, read_body
from server.payments import sandbox, webhooks
from server.payments.http import sandbox_request, webhook_url
from server.store.models import now_ms
from server.store.withdrawals import FAILED, PAID, PayoutEvent

log = logging.getLogger("giftstream.payouts")

WEBHOOK = "/v1/payouts/sandbox/webhook"
PROVIDER = "sandbox"
# event type -> the status it moves a withdrawal to
STATUS = {"payout.paid": PAID, "payout.failed": FAILED}


async def webhook(request: Request) -> Response:
    """POST /v1/payouts/sandbox/webhook: the payout provider says a withdrawal was paid or failed."""
    raw = await read_body(request, webhooks.MAX_BODY)
    node = node_of(request)
    webhooks.verify(node.settings.webhook_secret, raw, request.headers.get("giftstream-signature"))
    event_id, kind, data = parse(raw)
    w = await node.store.get_withdrawal(data["withdrawal_id"])
    if w is None:
        raise GiftstreamError(Err.NOT_FOUND, "no such withdrawal")
    if (data["amount_cents"], data["currency"]) != (w.amount_cents, node.catalog.currency):
        log.warning("payout webhook %s for withdrawal %s: %s %s, but it is %s %s; nothing applied", event_id, w.id,
                    data["amount_cents"], data["currency"], w.amount_cents, node.catalog.currency)
        raise GiftstreamError(Err.AMOUNT_MISMATCH, f"the event's amount or currency is not the withdrawal's "
                                                   f"({w.amount_cents} {node.catalog.currency})")
    event = PayoutEvent(event_id, PROVIDER, kind, w.id, now_ms(), raw.decode("utf-8", "replace"))
    status = STATUS[kind]
    applied = await node.store.apply_payout(event, status, data.get("reason") if status == FAILED else None)
    if applied.duplicate:
        return JSONResponse({"duplicate": True})
    return JSONResponse({"duplicate": False, "applied": applied.applied, "withdrawal_id": w.id,
                         "status": applied.withdrawal.status})


def parse(raw: bytes) -> tuple[str, str, dict[str, Any]]:
    """(event id, type, data) of a well-formed event, or 400 bad_request saying what is wrong
    (the envelope and the money fields are checked as the payment webhook's are)."""
    event_id, kind, data = webhooks.envelope(raw)
    if kind not in STATUS:
        raise GiftstreamError(Err.BAD_REQUEST, f"type must be one of {', '.join(STATUS)}")
    webhooks.money(data, "withdrawal_id", "account_closed")
    return event_id, kind, data


async def sandbox_payout(request: Request) -> Response:
    """POST /v1/sandbox/payouts/{withdrawal_id} {"outcome", "deliveries"?, "reason"?} (admin): the
    sandbox network sends that outcome's event to this server's payout webhook, `deliveries`
    times at once; the answer holds the event and each delivery's answer."""
    node, body, deliveries, reason = await sandbox_request(request, "account_closed")
    outcome = body.get("outcome")
    if outcome not in (PAID, FAILED):
        raise GiftstreamError(Err.BAD_REQUEST, f"outcome must be {PAID} or {FAILED}")
    w = await node.store.get_withdrawal(request.path_params["withdrawal_id"])
    if w is None:
        raise GiftstreamError(Err.NOT_FOUND, "no such withdrawal")
    data: dict[str, Any] = {"withdrawal_id": w.id, "amount_cents": w.amount_cents, "currency": node.catalog.currency}
    if outcome == FAILED:
        data["reason"] = reason or "account_closed"
    event = {"id": "evt_" + uuid.uuid4().hex, "type": f"payout.{outcome}", "created": int(time.time()), "data": data}
    answers = await sandbox.deliver(webhook_url(node.settings, WEBHOOK), node.settings.webhook_secret or "", event,
                                    deliveries)
    return JSONResponse({"event": event, "deliveries": answers})


ROUTES: list[BaseRoute] = [
    Route(WEBHOOK, webhook, methods=["POST"]),
    Route("/v1/sandbox/payouts/{withdrawal_id}", sandbox_payout, methods=["POST"]),
]
