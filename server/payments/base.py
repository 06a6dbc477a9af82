"""Payment provider interface. The sandbox implements it; a real provider adapter will too
(with signed webhooks for asynchronous results, refunds and chargebacks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from server.store.models import Order


@dataclass(frozen=True, slots=True)
class ChargeResult:
    # "paid", "declined" or "pending" (a webhook will tell later)
    status: str
    provider_ref: str
    decline_reason: str | None = None


class PaymentProvider(Protocol):
    name: str
    methods: tuple[str, ...]

    async def charge(self, order: Order) -> ChargeResult: ...
