"""The wallet's HTTP routes: balances, budget, statement, rewards, and support's restriction and
adjustment. Every failure is a GiftstreamError, answered by server/errors.py."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server import paging
from server.codes import Err, GiftstreamError
from server.http_api import json_body, node_of, principal_of
from server.wallet.history import DEFAULT_LIMIT, MAX_LIMIT, transactions

# A reason or key a person typed: kept short and printable, as it is stored and shown back.
MAX_TEXT = 200
# Whole coins or points an admin moves at once, and the largest budget: past any real figure,
# well inside Lua's exact integers.
MAX_AMOUNT = 10**12


def _whole(body: dict[str, Any], name: str, *, signed: bool = False) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not -MAX_AMOUNT <= value <= MAX_AMOUNT:
        raise GiftstreamError(Err.BAD_AMOUNT, f"{name} must be a whole number")
    if value == 0 or (value < 0 and not signed):
        raise GiftstreamError(Err.BAD_AMOUNT, f"{name} must be {'non-zero' if signed else 'positive'}")
    return value


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT or not value.isprintable():
        raise GiftstreamError(Err.BAD_REQUEST, f"{name} must be a string of 1 to {MAX_TEXT} printable characters")
    return value


def _only(body: dict[str, Any], *names: str) -> None:
    unknown = sorted(set(body) - set(names))
    if unknown:
        raise GiftstreamError(Err.BAD_REQUEST, f"unknown field {unknown[0]}; this body takes {', '.join(names)}")


def _target(request: Request) -> str:
    user_id = str(request.path_params["user_id"])
    if not 0 < len(user_id) <= 128 or not user_id.isprintable():
        raise GiftstreamError(Err.BAD_REQUEST, "bad user id")
    return user_id


async def wallet(request: Request) -> Response:
    """GET /v1/wallet."""
    p = principal_of(request)
    return JSONResponse({"user_id": p.user_id, **await node_of(request).wallet.view(p.user_id)})


async def set_budget(request: Request) -> Response:
    """PUT /v1/wallet/budget {"monthly_budget": coins | null}: lower at once, raise or remove 24 h later."""
    p = principal_of(request)
    body = await json_body(request)
    _only(body, "monthly_budget")
    if "monthly_budget" not in body:
        raise GiftstreamError(Err.BAD_REQUEST, "monthly_budget is required (a whole number of coins, or null)")
    budget = body["monthly_budget"]
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)
                               or not 0 <= budget <= MAX_AMOUNT):
        raise GiftstreamError(Err.BAD_REQUEST, "monthly_budget must be a whole number of coins, or null")
    node = node_of(request)
    await node.wallet.set_monthly_budget(p.user_id, budget)
    return JSONResponse({"user_id": p.user_id, **await node.wallet.view(p.user_id)})


async def wallet_transactions(request: Request) -> Response:
    """GET /v1/wallet/transactions?cursor=&limit=: every coin movement, newest first."""
    p = principal_of(request)
    cursor = request.query_params.get("cursor") or None
    limit = paging.whole(request.query_params, "limit", DEFAULT_LIMIT, MAX_LIMIT)
    node = node_of(request)
    page = await transactions(node.redis, node.store, node.settings.partitions, p.user_id, cursor, limit)
    return JSONResponse(page)


async def restrict(request: Request) -> Response:
    """POST /v1/admin/users/{user_id}/restrict {"reason"}: no gifts until unrestricted."""
    principal_of(request).require("admin")
    user_id = _target(request)
    body = await json_body(request)
    _only(body, "reason")
    node = node_of(request)
    await node.wallet.restrict(user_id, _text(body, "reason"))
    return JSONResponse({"user_id": user_id, **await node.wallet.view(user_id)})


async def unrestrict(request: Request) -> Response:
    """POST /v1/admin/users/{user_id}/unrestrict (a negative balance keeps its own restriction)."""
    principal_of(request).require("admin")
    user_id = _target(request)
    node = node_of(request)
    await node.wallet.unrestrict(user_id)
    return JSONResponse({"user_id": user_id, **await node.wallet.view(user_id)})


async def adjust(request: Request) -> Response:
    """POST /v1/admin/users/{user_id}/adjust {coins, reason, idempotency_key}: exactly once per key."""
    principal_of(request).require("admin")
    user_id = _target(request)
    body = await json_body(request)
    _only(body, "coins", "reason", "idempotency_key")
    coins, reason, key = _whole(body, "coins", signed=True), _text(body, "reason"), _text(body, "idempotency_key")
    moved = await node_of(request).wallet.adjust(user_id, key, coins, reason)
    return JSONResponse({"user_id": user_id, "coins": moved.coins, "change": coins, "idempotency_key": key,
                         "replayed": moved.replayed})


async def rewards(request: Request) -> Response:
    """GET /v1/rewards."""
    p = principal_of(request)
    node = node_of(request)
    view = await node.wallet.view(p.user_id)
    return JSONResponse({"points": view["points"],
                         "rate": {"points": node.settings.reward_rate_points, "coins": node.settings.reward_rate_coins},
                         "checked_in_today": await node.wallet.checked_in(p.user_id)})


async def check_in(request: Request) -> Response:
    """POST /v1/rewards/check-in: once per UTC day."""
    p = principal_of(request)
    node = node_of(request)
    moved = await node.wallet.check_in(p.user_id)
    return JSONResponse({"points": moved.points, "earned": node.settings.check_in_points, "checked_in_today": True})


async def grant_points(request: Request) -> Response:
    """POST /v1/admin/rewards {user_id, points, reason, idempotency_key}."""
    principal_of(request).require("admin")
    body = await json_body(request)
    _only(body, "user_id", "points", "reason", "idempotency_key")
    user_id, points = _text(body, "user_id"), _whole(body, "points")
    reason, key = _text(body, "reason"), _text(body, "idempotency_key")
    moved = await node_of(request).wallet.grant_points(user_id, key, points, reason)
    return JSONResponse({"user_id": user_id, "points": moved.points, "granted": points, "idempotency_key": key,
                         "replayed": moved.replayed})


async def redeem(request: Request) -> Response:
    """POST /v1/rewards/redeem {points, idempotency_key}: points into coins at the rate, in one script."""
    p = principal_of(request)
    body = await json_body(request)
    _only(body, "points", "idempotency_key")
    points, key = _whole(body, "points"), _text(body, "idempotency_key")
    node = node_of(request)
    moved = await node.wallet.redeem(p.user_id, key, points)
    return JSONResponse({"points": moved.points, "coins": moved.coins, "redeemed": points,
                         "credited": points // node.settings.reward_rate_points * node.settings.reward_rate_coins,
                         "idempotency_key": key, "replayed": moved.replayed})


ROUTES = [
    Route("/v1/wallet", wallet),
    Route("/v1/wallet/budget", set_budget, methods=["PUT"]),
    Route("/v1/wallet/transactions", wallet_transactions),
    Route("/v1/rewards", rewards),
    Route("/v1/rewards/check-in", check_in, methods=["POST"]),
    Route("/v1/rewards/redeem", redeem, methods=["POST"]),
    Route("/v1/admin/rewards", grant_points, methods=["POST"]),
    Route("/v1/admin/users/{user_id}/restrict", restrict, methods=["POST"]),
    Route("/v1/admin/users/{user_id}/unrestrict", unrestrict, methods=["POST"]),
    Route("/v1/admin/users/{user_id}/adjust", adjust, methods=["POST"]),
]
