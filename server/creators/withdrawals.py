"""Two-factor enrolment and diamond cash-out: /v1/me/2fa, /v1/me/withdrawals, the payout webhook.

A cash-out, top to bottom (POST /v1/me/withdrawals): a key seen before answers its withdrawal;
then each refusal in the order a host meets them: no active two-factor, a wrong or used code,
below the minimum, diamonds not worth whole cents (half a cent each by default: an odd number),
more than the available diamonds, over the UTC day's maximum. The last two,
the code's time step and the reservation are decided in one SQL transaction that holds the host
(store/withdrawals.py), so concurrent requests never reserve more than the host has, and a
refused request leaves its code unused. The payout provider then says paid or failed
(creators/payouts.py).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from server import paging
from server.codes import Err, GiftstreamError
from server.creators import payouts, twofactor
from server.http_api import json_body, node_of, principal_of, whole_number
from server.node import Node
from server.store.rows import DAY_MS
from server.store.withdrawals import PENDING, Reservation, Withdrawal

# More diamonds than any host can hold (units of them must fit a BIGINT): refused as more than
# available without asking the database.
MAX_DIAMONDS = 10**14
MAX_KEY = 64


def withdrawal_json(w: Withdrawal, node: Node) -> dict[str, Any]:
    return {"withdrawal_id": w.id, "status": w.status, "diamonds": w.diamonds, "amount_cents": w.amount_cents,
            "currency": node.catalog.currency, "created_at": w.created_ms, "updated_at": w.updated_ms}


def whole_cents_step(millicents: int) -> int:
    """The fewest diamonds worth whole cents at `millicents` a diamond (2 at half a cent)."""
    return 1000 // math.gcd(millicents, 1000)


def _replay(w: Withdrawal, diamonds: int, node: Node) -> Response:
    """The withdrawal a key named already: the same answer again, or a conflict."""
    if w.diamonds != diamonds:
        raise GiftstreamError(Err.IDEMPOTENCY_CONFLICT,
                              f"this idempotency_key was used for a withdrawal of {w.diamonds} diamonds")
    return JSONResponse(withdrawal_json(w, node), status_code=202)


def _request(body: dict[str, Any]) -> tuple[int, str, str | None]:
    diamonds, key = whole_number(body, "diamonds"), body.get("idempotency_key")
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY or not key.isprintable():
        raise GiftstreamError(Err.BAD_REQUEST, f"idempotency_key must be a string of 1 to {MAX_KEY} printable "
                                               "characters")
    return diamonds, key, twofactor.code_in(body, "totp")


async def withdraw(request: Request) -> Response:
    """POST /v1/me/withdrawals {"diamonds", "totp", "idempotency_key"}: cash out diamonds (202 pending)."""
    p = principal_of(request)
    p.require("host", "admin")
    node = node_of(request)
    store, settings = node.store, node.settings
    diamonds, key, code = _request(await json_body(request))
    seen = await store.withdrawal_by_key(p.user_id, key)
    if seen is not None:  # a retry: no code needed, nothing reserved again
        return _replay(seen, diamonds, node)
    tf = await store.twofactor(p.user_id)
    if tf is None or tf.secret is None:
        raise GiftstreamError(Err.TWO_FA_REQUIRED, "cash-out needs two-factor authentication: enrol at "
                                                   "POST /v1/me/2fa, then confirm a code")
    now = time.time()
    step = await twofactor.check(store, settings, tf, tf.secret, code, now)
    if diamonds < settings.withdraw_min_diamonds:
        await store.totp_passed(p.user_id)
        raise GiftstreamError(Err.BELOW_MINIMUM, f"a withdrawal is at least {settings.withdraw_min_diamonds} diamonds")
    per = whole_cents_step(settings.diamond_millicents)
    if diamonds % per:
        # Paid in cents: rounding down would keep part of a diamond's worth, rounding up pay more.
        await store.totp_passed(p.user_id)
        raise GiftstreamError(Err.BAD_REQUEST, f"diamonds must come to whole cents: a multiple of {per} at "
                                               f"{settings.diamond_millicents / 1000:g} cents a diamond")
    now_ms = int(now * 1000)
    w = Withdrawal(uuid.uuid4().hex, p.user_id, key, diamonds, diamonds * settings.diamond_millicents // 1000,
                   PENDING, now_ms, now_ms)
    outcome = Reservation.INSUFFICIENT
    if diamonds <= MAX_DIAMONDS:
        w, outcome = await store.reserve_withdrawal(w, tf.secret, step, now_ms - now_ms % DAY_MS,
                                                    settings.withdraw_daily_max_diamonds)
    if outcome is Reservation.REUSED_CODE:  # another request took this code's step meanwhile
        raise GiftstreamError(Err.BAD_2FA_CODE, "the two-factor code is wrong or was used already")
    await store.totp_passed(p.user_id)
    if outcome is Reservation.EXISTING:
        return _replay(w, diamonds, node)
    if outcome is Reservation.INSUFFICIENT:
        raise GiftstreamError(Err.INSUFFICIENT_DIAMONDS, "more diamonds than the available ones (held and "
                                                         "pending ones are not available)")
    if outcome is Reservation.OVER_DAILY:
        raise GiftstreamError(Err.OVER_DAILY_LIMIT, f"at most {settings.withdraw_daily_max_diamonds} diamonds a "
                                                    "UTC day, pending and paid withdrawals counted")
    return JSONResponse(withdrawal_json(w, node), status_code=202)


async def withdrawals(request: Request) -> Response:
    """GET /v1/me/withdrawals?cursor=&limit=: the caller's withdrawals, newest first."""
    p = principal_of(request)
    p.require("host", "admin")
    node = node_of(request)
    limit, before = paging.limit(request.query_params), paging.cursor(request.query_params)
    found = await node.store.host_withdrawals(p.user_id, before, limit + 1)
    page, after = paging.page(found, limit, lambda wm: (wm[0].created_ms, wm[0].id))
    return JSONResponse({
        "withdrawals": [{**withdrawal_json(w, node), "failure_reason": w.failure_reason,
                         "transitions": [{"status": s, "at": at} for s, at in made]} for w, made in page],
        "next_cursor": after})


ROUTES: list[BaseRoute] = [
    *twofactor.ROUTES,
    Route("/v1/me/withdrawals", withdraw, methods=["POST"]),
    Route("/v1/me/withdrawals", withdrawals, methods=["GET"]),
    *payouts.ROUTES,
]
