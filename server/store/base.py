"""The durable store interface; SQLite and PostgreSQL implement it the same way. Times are integer ms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from server.movement import Movement
from server.store.earnings import EarningsStore
from server.store.models import Applied, Order, PartitionTotals, PaymentEvent, Plan, Room, SettleResult, Transition
from server.store.sessions import SessionsStore
from server.store.videos import VideosStore
from server.store.withdrawals import WithdrawalsStore

# Decides what an outcome does to an order, from the order and the transitions it has made
# (payments/orders.py); the store calls it inside the transaction that holds the order.
Planner = Callable[[Order, list[Transition]], Plan]


class Store(EarningsStore, WithdrawalsStore, SessionsStore, VideosStore, Protocol):
    kind: str

    async def migrate(self) -> int: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...

    async def upsert_user(self, user_id: str, name: str) -> None: ...

    async def create_order(self, order: Order) -> tuple[Order, bool]:
        """Insert, or return the order already stored under (user_id, idempotency_key). A new order
        gets the transition to its first status."""
        ...

    async def order_by_payment(self, payment_id: str) -> Order | None: ...
    async def user_orders(self, user_id: str, before: tuple[int, str] | None, limit: int) -> list[Order]:
        """A user's orders newest first, older than `before` (created_ms, order id) when given."""
        ...

    async def order_transitions(self, order_id: str) -> list[Transition]: ...

    async def apply(self, order_id: str, event: PaymentEvent | None, plan: Planner) -> Applied:
        """In one transaction holding the order: record `event` (a duplicate id changes nothing
        and says so), ask `plan` what it does, write those transitions keyed (order, status) and
        the order's new status. A transition that moves coins is written not done."""
        ...

    async def transitions_todo(self, limit: int = 1000) -> list[Transition]:
        """Transitions whose coin movement is still to make, oldest first."""
        ...

    async def transition_done(self, order_id: str, status: str) -> None: ...
    async def pending_before(self, created_ms: int, limit: int = 1000) -> list[Order]:
        """Orders still pending that were created before `created_ms` (the expiry sweep)."""
        ...

    async def payment_figures(self, limit: int) -> dict[str, Any]:
        """For `giftstream audit`: events and transitions, paid orders (id, user, coins) whose credit
        is made, and the first `limit` credits that do not match their order."""
        ...

    async def set_order_status(self, order_id: str, status: str, *, only_from: str | None = None) -> bool: ...
    async def get_order(self, order_id: str) -> Order | None: ...
    async def orders_with_status(self, status: str, limit: int = 1000) -> list[Order]: ...

    async def create_room(self, room: Room) -> None: ...
    async def end_room(self, room_id: str, ended_ms: int) -> None: ...
    async def get_room(self, room_id: str) -> Room | None: ...

    async def settle(self, movements: list[Movement], hold_window_ms: int = ...) -> SettleResult:
        """Write movements, gift rows, ledger entries, host credit (and per day) and the holds of
        refunds and disputes (store/holds.py, gifts sent up to `hold_window_ms` before them) in
        one transaction, idempotent on (partition, seq): a movement seen before changes nothing."""
        ...

    def is_permanent(self, exc: BaseException) -> bool:
        """True when `settle` failed on the data itself (a constraint, a value the column cannot
        hold): retrying the same movements fails the same way. False for the database being away
        or busy, which a retry outlasts."""
        ...

    async def earnings(self, host_id: str) -> tuple[int, int]:
        """(diamond units, gifts received) for a host."""
        ...

    # audit and rebuild
    async def partition_totals(self, partition: int, max_seq: int) -> PartitionTotals: ...
    async def settled_seqs(self, partition: int, seqs: list[int]) -> set[int]: ...
    async def diamond_figures(self) -> dict[str, int]: ...
    async def unbalanced_movements(self, limit: int) -> tuple[int, list[tuple[int, int, str, int]]]:
        """Movements whose ledger entries do not sum to zero in some unit: how many (movement,
        unit) pairs in all, and the first `limit` of them as (partition, seq, unit, sum)."""
        ...

    async def wallet_totals(self) -> dict[str, tuple[int, int]]:
        """user -> (coins credited, coins spent) from settled movements."""
        ...

    # coin economy
    async def partition_kind_totals(self, partition: int, max_seq: int) -> dict[str, tuple[int, int]]:
        """kind -> (coin change, points change) summed over the partition's settled keyed movements
        up to max_seq."""
        ...

    async def wallet_kind_totals(self) -> dict[str, dict[str, tuple[int, int]]]:
        """user -> kind -> (coin change, points change) of settled keyed movements."""
        ...

    async def user_movements(self, user_id: str, before_seq: int, limit: int) -> list[Movement]:
        """The user's settled coin movements numbered below before_seq, newest first (a gift's and
        a credit's own fields beyond the movements row are left empty)."""
        ...
