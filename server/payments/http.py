"""HTTP routes of payments: recharges and their orders, the provider's webhook, and the sandbox
provider's driver (what a test or a demo uses to play the payment network)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.codes import Err, GiftstreamError
from server.http_api import json_body, node_of, principal_of, read_body, whole_number
from server.node import Node
from server.payments import sandbox, webhooks
from server.payments.orders import Outcome
from server.settings import Settings

MAX_DELIVERIES = 5


async def recharge(request: Request) -> Response:
    p = principal_of(request)
    node = node_of(request)
    if node.draining:
        raise GiftstreamError(Err.UNAVAILABLE, "server restarting; retry with the same idempotency_key")
    status, body = await node.recharges.recharge(p, await json_body(request))
    return JSONResponse(body, status_code=status)


async def orders(request: Request) -> Response:
    p = principal_of(request)
    return JSONResponse(await node_of(request).recharges.page(p, dict(request.query_params)))


async def order(request: Request) -> Response:
    p = principal_of(request)
    return JSONResponse(await node_of(request).recharges.get(p, request.path_params["order_id"]))


async def webhook(request: Request) -> Response:
    raw = await read_body(request, webhooks.MAX_BODY)
    answer = await node_of(request).webhooks.receive(raw, request.headers.get("giftstream-signature"))
    return JSONResponse(answer)


async def sandbox_payment(request: Request) -> Response:
    """POST /v1/sandbox/payments/{payment_id} {"outcome", "deliveries"?, "reason"?} (admin): the
    sandbox network sends that outcome's event to this server's webhook, `deliveries` times at
    once; the answer holds the event and each delivery's answer."""
    node, body, deliveries, reason = await sandbox_request(request, "card_declined")
    try:
        outcome = Outcome(str(body.get("outcome")))
    except ValueError:
        raise GiftstreamError(Err.BAD_REQUEST, f"outcome must be one of {', '.join(Outcome)}") from None
    found = await node.store.order_by_payment(request.path_params["payment_id"])
    if found is None:
        raise GiftstreamError(Err.NOT_FOUND, "no such payment")
    event = sandbox.event(found, outcome, reason)
    answers = await sandbox.deliver(webhook_url(node.settings), node.settings.webhook_secret or "", event, deliveries)
    return JSONResponse({"event": event, "deliveries": answers})


async def sandbox_request(request: Request, reason_example: str) -> tuple[Node, dict[str, Any], int, str | None]:
    """What every sandbox driver (payments, payouts) reads first: an admin's request while the
    sandbox is on, its body, `deliveries` (1 to MAX_DELIVERIES, default 1) and `reason` (or None)."""
    principal_of(request).require("admin")
    node = node_of(request)
    if not node.settings.sandbox:
        raise GiftstreamError(Err.NOT_FOUND, "the sandbox provider is off (GIFTSTREAM_SANDBOX=0)")
    body = await json_body(request)
    deliveries = whole_number(body, "deliveries", MAX_DELIVERIES, default=1)
    reason = body.get("reason")
    if reason is not None and not (isinstance(reason, str) and 0 < len(reason) <= 64):
        raise GiftstreamError(Err.BAD_REQUEST, f"reason must be a short code such as {reason_example}")
    return node, body, deliveries, reason


def webhook_url(settings: Settings, path: str = "/v1/payments/sandbox/webhook") -> str:
    """This server's own webhook (the payments one, or `path`), as the sandbox network reaches it."""
    host = settings.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}{path}"


def routes() -> list[Any]:
    return [
        Route("/v1/recharges", recharge, methods=["POST"]),
        Route("/v1/recharges", orders, methods=["GET"]),
        Route("/v1/recharges/{order_id}", order, methods=["GET"]),
        Route("/v1/payments/sandbox/webhook", webhook, methods=["POST"]),
        Route("/v1/sandbox/payments/{payment_id}", sandbox_payment, methods=["POST"]),
    ]
