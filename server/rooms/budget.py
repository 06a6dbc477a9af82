"""A node's socket writes per second, shared by its rooms: how often each room may send a frame.

Fan-out is paid per socket per frame (one write, about 5-10 us of CPU here), so a room's
frames per second times its local sockets is what it costs the node. A node has a budget of
writes per second (`fanout_writes_per_s`); the rooms that are sending share it max-min fairly:
a room whose sockets at the full tick rate cost less than an even share gets all it asks, and
what it leaves goes to the bigger ones. A room's frame interval is then its sockets over its
share (never less than the tick): a 100-socket room beside a 100,000-socket one still gets a
frame every tick, and the big one lowers its frame rate until the node's writes fit.

Pure: numbers in, numbers out.
"""

from __future__ import annotations

from collections.abc import Sequence


def fair_shares(demands: Sequence[float], budget: float) -> list[float]:
    """Max-min fair split of `budget` over `demands` (each gets at most what it asks)."""
    shares = [0.0] * len(demands)
    left = budget
    order = sorted(range(len(demands)), key=lambda i: demands[i])
    for n, i in enumerate(order):
        even = left / (len(order) - n)
        shares[i] = min(demands[i], even)
        left -= shares[i]
    return shares


def frame_intervals(sockets: Sequence[int], budget: float, tick: float) -> list[float]:
    """Seconds between two frames of each room, given its local sockets, the node's writes per
    second (`budget`, 0: no limit) and the tick (seconds)."""
    if budget <= 0:
        return [tick] * len(sockets)
    wants = [n / tick for n in sockets]  # writes per second at one frame a tick
    return [max(tick, n / share) if share > 0 else tick
            for n, share in zip(sockets, fair_shares(wants, budget), strict=True)]
