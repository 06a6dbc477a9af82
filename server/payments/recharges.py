"""Recharge orders: recorded durably first, charged, then credited exactly once."""

from __future__ import annotations

import uuid
from typing import Any

from server.auth import Principal
from server.catalog import Catalog, Package
from server.codes import Err, GiftstreamError
from server.payments.base import PaymentProvider
from server.store.base import Store
from server.store.models import ORDER_CREDITED, ORDER_DECLINED, ORDER_PAID, ORDER_PENDING, Order, now_ms
from server.wallet.service import Wallet


class Recharges:
    def __init__(self, store: Store, wallet: Wallet, catalog: Catalog, provider: PaymentProvider) -> None:
        self.store = store
        self.wallet = wallet
        self.catalog = catalog
        self.provider = provider

    def package_for(self, body: dict[str, Any]) -> Package:
        package_id, coins = body.get("package_id"), body.get("coins")
        if package_id is not None and coins is not None:
            raise GiftstreamError(Err.BAD_REQUEST, "give either package_id or coins, not both")
        if isinstance(package_id, str):
            return self.catalog.package(package_id)
        if isinstance(coins, int) and not isinstance(coins, bool):
            return self.catalog.custom(coins)
        raise GiftstreamError(Err.BAD_REQUEST, "give package_id (string) or coins (integer)")

    async def recharge(self, principal: Principal, body: dict[str, Any]) -> dict[str, Any]:
        if not principal.is_adult():
            raise GiftstreamError(Err.AGE_RESTRICTED, "you must be 18 or older to buy coins")
        key = body.get("idempotency_key")
        if not isinstance(key, str) or not 0 < len(key) <= 128 or not key.isprintable():
            raise GiftstreamError(Err.BAD_REQUEST, "idempotency_key must be a string of 1 to 128 printable characters")
        method = body.get("payment_method")
        if method not in self.provider.methods:
            raise GiftstreamError(Err.UNSUPPORTED_PAYMENT_METHOD,
                                  f"payment_method must be one of {', '.join(self.provider.methods)}")
        pkg = self.package_for(body)
        draft = Order(uuid.uuid4().hex, principal.user_id, key, pkg.id, pkg.coins, pkg.price_cents,
                      pkg.currency, method, ORDER_PENDING, now_ms())
        await self.store.upsert_user(principal.user_id, principal.name)
        order, created = await self.store.create_order(draft)
        if not created and (order.package_id, order.coins, order.payment_method) != (
                draft.package_id, draft.coins, draft.payment_method):
            raise GiftstreamError(Err.IDEMPOTENCY_CONFLICT,
                                  "this idempotency_key was used for a different recharge")
        return await self._advance(order)

    async def _advance(self, order: Order) -> dict[str, Any]:
        """Move an order as far as it can go; safe to repeat at any step (retries, restarts)."""
        status = order.status
        if status == ORDER_PENDING:
            result = await self.provider.charge(order)
            if result.status == "declined":
                await self.store.set_order_status(order.id, ORDER_DECLINED, only_from=ORDER_PENDING)
                raise GiftstreamError(Err.PAYMENT_DECLINED, "the payment was declined")
            if result.status != "paid":
                return {**order.to_json(), "status": ORDER_PENDING}
            await self.store.set_order_status(order.id, ORDER_PAID, only_from=ORDER_PENDING)
            status = ORDER_PAID
        if status == ORDER_DECLINED:
            raise GiftstreamError(Err.PAYMENT_DECLINED, "the payment was declined")
        # paid or credited: crediting again is a no-op keyed on the order id.
        balance = await self.wallet.credit(order.user_id, order.id, order.coins)
        return {**order.to_json(), "status": ORDER_CREDITED, "balance": balance}

    async def reconcile(self) -> int:
        """Credit orders that were paid but not credited (a crash between the two steps)."""
        done = 0
        for order in await self.store.orders_with_status(ORDER_PAID):
            await self.wallet.credit(order.user_id, order.id, order.coins)
            done += 1
        return done
