"""Payment provider interface. The sandbox implements it; a real provider adapter will too:
it charges an order (or starts the payment and leaves the outcome to its signed webhook), and
names each payment with an id its webhooks repeat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from server.store.models import Order

# ChargeResult.status
PAID = "paid"
DECLINED = "declined"
PENDING = "pending"  # the provider's webhook tells the outcome later


@dataclass(frozen=True, slots=True)
class ChargeResult:
    status: str
    decline_reason: str | None = None


class PaymentProvider(Protocol):
    name: str
    # payment_method -> the channels it is offered on
    methods: dict[str, tuple[str, ...]]
    # methods that take a `card_number`
    card_methods: frozenset[str]
    # methods whose charge decides at once (the rest answer pending and decide by webhook)
    instant: frozenset[str]

    def payment_id(self, order_id: str) -> str:
        """The provider's id for the payment of this order (stable: a retry names the same one)."""
        ...

    async def charge(self, order: Order, card_number: str | None) -> ChargeResult: ...


# decline_reason -> the sentence shown to the person paying.
DECLINE_MESSAGES = {
    "card_declined": "Your card was declined. Try another card or another payment method.",
    "insufficient_funds": "Your card has insufficient funds. Try another card or another payment method.",
    "expired_card": "Your card has expired. Try another card or another payment method.",
    "incorrect_cvc": "Your card's security code is incorrect. Check it and try again with a new key.",
    "processing_error": "The payment could not be processed. Try again in a few minutes.",
    "fraudulent": "The payment was declined by the card issuer. Try another payment method.",
}
DECLINE_DEFAULT = "The payment was declined. Try another card or another payment method."


def decline_message(reason: str | None) -> str:
    return DECLINE_MESSAGES.get(reason or "", DECLINE_DEFAULT)
