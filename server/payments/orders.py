"""The order state machine, pure: what an outcome does to an order, given what it has done.

An order reaches each status at most once (transitions are keyed (order, status)). The plan
for an outcome is the statuses it reaches, in order, with the coins each one moves:

    succeeded     pending | declined | expired -> credited (+coins). The money was taken: a
                  success after our expiry, or after a decline it overrides, is still credited.
    declined      pending | expired -> declined (a success seen first wins: nothing).
    expired       pending -> expired (the sweep, or the provider saying so).
    refunded      credited... -> refunded (-coins, unless a dispute holds them already).
    disputed      credited... -> disputed (-coins, unless a refund took them already).
    dispute_won   disputed -> dispute_won (+coins, if the dispute took them and no refund
                  holds them since).
    dispute_lost  disputed -> dispute_lost (nothing: they stay taken).

An outcome that needs an earlier one (a refund before the success was delivered) makes the
earlier transitions first, so the end state and the coins moved are the same in whatever order
the provider's events arrive. An outcome the order is past (a second refund, a decline after
the credit) plans nothing: its event is recorded as ignored.
"""

from __future__ import annotations

from enum import StrEnum

from server.store.models import (
    ORDER_CREDITED,
    ORDER_DECLINED,
    ORDER_DISPUTE_LOST,
    ORDER_DISPUTE_WON,
    ORDER_DISPUTED,
    ORDER_EXPIRED,
    ORDER_PAID,
    ORDER_PENDING,
    ORDER_REFUNDED,
    Order,
    Plan,
    Transition,
)


class Outcome(StrEnum):
    """What the payment network says happened (the sandbox driver's `outcome` values)."""

    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    EXPIRED = "expired"
    REFUNDED = "refunded"
    DISPUTED = "disputed"
    DISPUTE_WON = "dispute_won"
    DISPUTE_LOST = "dispute_lost"


def plan(order: Order, reached: list[Transition], outcome: Outcome, reason: str | None = None) -> Plan:
    """The transitions `outcome` makes on `order`, which has made `reached` so far."""
    done = {t.status: t for t in reached}
    steps: list[tuple[str, int]] = []

    def credit() -> None:
        # A legacy order marked paid has its credit made by Recharges.reconcile: not again here.
        if ORDER_CREDITED not in done and ORDER_PAID not in done:
            steps.append((ORDER_CREDITED, order.coins))

    def clawed_by_dispute() -> bool:
        dispute = done.get(ORDER_DISPUTED)
        return dispute is not None and dispute.coins < 0 and ORDER_DISPUTE_WON not in done

    def dispute() -> None:
        if ORDER_DISPUTED not in done:
            credit()
            coins = 0 if ORDER_REFUNDED in done else -order.coins
            steps.append((ORDER_DISPUTED, coins))
            done[ORDER_DISPUTED] = Transition(order.id, ORDER_DISPUTED, 0, None, coins, None)

    if outcome is Outcome.SUCCEEDED:
        credit()
    elif outcome is Outcome.DECLINED:
        if not _paid(done) and ORDER_DECLINED not in done:
            return Plan(((ORDER_DECLINED, 0),), reason or "declined")
    elif outcome is Outcome.EXPIRED:
        if set(done) <= {ORDER_PENDING}:
            steps.append((ORDER_EXPIRED, 0))
    elif outcome is Outcome.REFUNDED:
        if ORDER_REFUNDED not in done:
            credit()
            steps.append((ORDER_REFUNDED, 0 if clawed_by_dispute() else -order.coins))
    elif outcome is Outcome.DISPUTED:
        dispute()
    elif ORDER_DISPUTE_WON not in done and ORDER_DISPUTE_LOST not in done:  # the dispute closed
        dispute()
        if outcome is Outcome.DISPUTE_WON:
            # What the dispute took comes back, unless a refund since then holds it.
            steps.append((ORDER_DISPUTE_WON, 0 if ORDER_REFUNDED in done else -done[ORDER_DISPUTED].coins))
        else:
            steps.append((ORDER_DISPUTE_LOST, 0))
    return Plan(tuple(steps))


def _paid(done: dict[str, Transition]) -> bool:
    return ORDER_CREDITED in done or ORDER_PAID in done
