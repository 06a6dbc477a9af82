"""Recharge orders: recorded durably first, charged, then moved on exactly once.

The use case, top to bottom: validate the request (age, key, method, channel, card, package),
record the order (pending, with the price of its channel and the provider's payment id), ask
the provider, and apply what it answered. Later outcomes (webhooks, the expiry sweep) come in
through `apply` too. Applying is two steps:

1. SQL, in one transaction holding the order: the outcome's transitions, keyed (order, status),
   planned by payments/orders.py from the transitions made before. A transition that moves coins
   is written "to do".
2. Redis: each such movement by its keyed Lua script (credit.lua per order id, the wallet's
   claw-back and reversal per (kind, order id)), then marked done.

A crash between the two leaves the movement "to do": `reconcile` makes it at start and the
sweep every few seconds, and a redelivered webhook makes it too. The scripts are keyed, so
however often it is made, it moves the coins once.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from server import paging
from server.auth import Principal
from server.catalog import Catalog, Package
from server.codes import Err, GiftstreamError
from server.movement import Kind
from server.payments.base import DECLINED, PAID, PaymentProvider, decline_message
from server.payments.orders import Outcome, plan
from server.store.base import Store
from server.store.models import (
    ORDER_CREDITED,
    ORDER_DECLINED,
    ORDER_DISPUTE_WON,
    ORDER_DISPUTED,
    ORDER_PAID,
    ORDER_PENDING,
    ORDER_REFUNDED,
    ORDERS_PAID,
    Applied,
    Order,
    PaymentEvent,
    Transition,
    now_ms,
)
from server.wallet.service import Wallet

log = logging.getLogger("giftstream.payments")



class Recharges:
    def __init__(self, store: Store, wallet: Wallet, catalog: Catalog, provider: PaymentProvider) -> None:
        self.store = store
        self.wallet = wallet
        self.catalog = catalog
        self.provider = provider

    # --- POST /v1/recharges ------------------------------------------------------------------

    async def recharge(self, principal: Principal, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): 201 credited, 202 pending; a decline raises payment_declined."""
        if not principal.is_adult():
            raise GiftstreamError(Err.AGE_RESTRICTED, "you must be 18 or older to buy coins")
        key = body.get("idempotency_key")
        if not isinstance(key, str) or not 0 < len(key) <= 128 or not key.isprintable():
            raise GiftstreamError(Err.BAD_REQUEST, "idempotency_key must be a string of 1 to 128 printable characters")
        method, channel = self._method_and_channel(body)
        card = self._card_number(body, method)
        pkg = self._package(body, channel)
        order_id = uuid.uuid4().hex
        draft = Order(order_id, principal.user_id, key, pkg.id, pkg.coins, pkg.price(channel), pkg.currency, method,
                      ORDER_PENDING, now_ms(), channel, self.provider.payment_id(order_id))
        await self.store.upsert_user(principal.user_id, principal.name)
        order, created = await self.store.create_order(draft)
        if not created and (order.package_id, order.coins, order.payment_method, order.channel) != (
                draft.package_id, draft.coins, draft.payment_method, draft.channel):
            raise GiftstreamError(Err.IDEMPOTENCY_CONFLICT,
                                  "this idempotency_key was used for a different recharge")
        if order.status == ORDER_PENDING and (created or order.payment_method in self.provider.instant):
            # A new order, or an instant one whose charge a crash interrupted: the provider charges
            # a payment id once, so asking again is safe. (A pending one waits for its webhook.)
            result = await self.provider.charge(order, card)
            if result.status == DECLINED:
                order = (await self.apply(order, Outcome.DECLINED, result.decline_reason)).order
            elif result.status == PAID:
                order = (await self.apply(order, Outcome.SUCCEEDED)).order
        else:
            await self.finish(order)
        if order.status == ORDER_DECLINED:
            raise self.declined(order)
        out = await self.order_json(order)
        if order.status in ORDERS_PAID:
            out["balance"] = (await self.wallet.balance(order.user_id))["coins"]
            return 201, out
        return 202, out

    def _method_and_channel(self, body: dict[str, Any]) -> tuple[str, str]:
        method = body.get("payment_method")
        methods = self.provider.methods
        if not isinstance(method, str) or method not in methods:
            raise GiftstreamError(Err.UNSUPPORTED_PAYMENT_METHOD, f"payment_method must be one of {', '.join(methods)}")
        channel = body.get("channel", methods[method][0])
        if not isinstance(channel, str) or channel not in self.catalog.channels:
            raise GiftstreamError(Err.BAD_REQUEST, f"channel must be one of {', '.join(self.catalog.channels)}")
        if channel not in methods[method]:
            offered = [m for m, channels in methods.items() if channel in channels]
            raise GiftstreamError(Err.UNSUPPORTED_PAYMENT_METHOD,
                                  f"{method} is not offered on the {channel} channel; there, use {', '.join(offered)}")
        return method, channel

    def _card_number(self, body: dict[str, Any], method: str) -> str | None:
        card = body.get("card_number")
        if card is None:
            return None
        if method not in self.provider.card_methods:
            raise GiftstreamError(Err.BAD_REQUEST, f"card_number is for card payments, not {method}")
        digits = card.replace(" ", "").replace("-", "") if isinstance(card, str) else ""
        if not (digits.isdigit() and digits.isascii() and 12 <= len(digits) <= 19):
            raise GiftstreamError(Err.BAD_REQUEST, "card_number must be 12 to 19 digits")
        return digits

    def _package(self, body: dict[str, Any], channel: str) -> Package:
        package_id, coins = body.get("package_id"), body.get("coins")
        if package_id is not None and coins is not None:
            raise GiftstreamError(Err.BAD_REQUEST, "give either package_id or coins, not both")
        if isinstance(package_id, str):
            return self.catalog.package(package_id)
        if isinstance(coins, int) and not isinstance(coins, bool):
            return self.catalog.custom(coins, channel)
        raise GiftstreamError(Err.BAD_REQUEST, "give package_id (string) or coins (integer)")

    @staticmethod
    def declined(order: Order) -> GiftstreamError:
        return GiftstreamError(Err.PAYMENT_DECLINED, decline_message(order.decline_reason),
                               decline_reason=order.decline_reason or "declined", order_id=order.id,
                               payment_id=order.payment_id)

    # --- applying outcomes -------------------------------------------------------------------

    async def apply(self, order: Order, outcome: Outcome, reason: str | None = None,
                    event: PaymentEvent | None = None) -> Applied:
        """Apply an outcome to an order once (a duplicate event changes nothing), then make the
        coin movements the order still owes."""
        applied = await self.store.apply(order.id, event, lambda o, reached: plan(o, reached, outcome, reason))
        await self.finish(applied.order)
        return applied

    async def finish(self, order: Order) -> None:
        """Make the order's coin movements still to do (after a crash, a Redis outage, or by a
        redelivery racing the first delivery: each is keyed, so it moves coins once)."""
        for t in await self.store.order_transitions(order.id):
            if t.done_ms is None:
                await self._move(order, t)

    async def _move(self, order: Order, t: Transition) -> None:
        if t.status == ORDER_CREDITED and t.coins > 0:
            await self.wallet.credit(order.user_id, order.id, t.coins)
        elif t.status in (ORDER_REFUNDED, ORDER_DISPUTED) and t.coins < 0:
            kind = Kind.REFUND if t.status == ORDER_REFUNDED else Kind.DISPUTE
            await self.wallet.claw_back(order.user_id, ref=order.id, coins=-t.coins, kind=kind)
        elif t.status == ORDER_DISPUTE_WON and t.coins > 0:
            await self.wallet.reverse_claw_back(order.user_id, ref=order.id, coins=t.coins)
        await self.store.transition_done(order.id, t.status)

    async def reconcile(self, older_than_ms: int = 0) -> int:
        """Make every coin movement still to do (transitions at least `older_than_ms` old), and
        credit orders of the time before transitions left paid but not credited."""
        done = 0
        cutoff = now_ms() - older_than_ms
        for t in await self.store.transitions_todo():
            if t.at_ms > cutoff:
                continue
            order = await self.store.get_order(t.order_id)
            assert order is not None, "orders are never deleted"
            await self._move(order, t)
            done += 1
        for order in await self.store.orders_with_status(ORDER_PAID):
            await self.wallet.credit(order.user_id, order.id, order.coins)
            done += 1
        return done

    async def expire_due(self, expiry_s: int) -> int:
        """Expire orders pending for longer than `expiry_s`; how many were."""
        expired = 0
        for order in await self.store.pending_before(now_ms() - expiry_s * 1000):
            applied = await self.apply(order, Outcome.EXPIRED)
            expired += bool(applied.new)
        return expired

    # --- reading orders ----------------------------------------------------------------------

    async def order_json(self, order: Order) -> dict[str, Any]:
        transitions = await self.store.order_transitions(order.id)
        return {**order.to_json(), "decline_message": decline_message(order.decline_reason)
                if order.status == ORDER_DECLINED else None,
                "transitions": [{"status": t.status, "at": t.at_ms} for t in transitions],
                "updated_at": transitions[-1].at_ms if transitions else order.created_ms}

    async def get(self, principal: Principal, order_id: str) -> dict[str, Any]:
        order = await self.store.get_order(order_id)
        if order is None or (order.user_id != principal.user_id and principal.role != "admin"):
            raise GiftstreamError(Err.NOT_FOUND, "no such order")
        return await self.order_json(order)

    async def page(self, principal: Principal, params: dict[str, str]) -> dict[str, Any]:
        """GET /v1/recharges: the caller's orders (an admin: `user_id`'s), newest first."""
        user_id = params.get("user_id", principal.user_id)
        if user_id != principal.user_id and principal.role != "admin":
            raise GiftstreamError(Err.FORBIDDEN, "only an admin can list another user's orders")
        limit, before = paging.limit(params), paging.cursor(params)
        orders = await self.store.user_orders(user_id, before, limit + 1)
        page, after = paging.page(orders, limit, lambda o: (o.created_ms, o.id))
        return {"orders": [await self.order_json(o) for o in page], "next_cursor": after}
