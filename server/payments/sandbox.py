"""Built-in sandbox provider: `sandbox_card` pays at once, `sandbox_card_declined` is refused."""

from __future__ import annotations

import hashlib

from server.payments.base import ChargeResult
from server.store.models import Order


class SandboxProvider:
    name = "sandbox"
    methods: tuple[str, ...] = ("sandbox_card", "sandbox_card_declined")

    async def charge(self, order: Order) -> ChargeResult:
        ref = "sbx_" + hashlib.sha256(order.id.encode()).hexdigest()[:20]
        if order.payment_method == "sandbox_card_declined":
            return ChargeResult("declined", ref, "card_declined")
        return ChargeResult("paid", ref)
