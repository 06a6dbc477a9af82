"""Prometheus metrics: what operators page on, as histograms and counters.

Every metric is defined here, once; the code that measures imports the object and
observes it. `/metrics` renders the default registry (or, under `serve --workers N`,
every worker's values through prometheus-client's multiprocess mode).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# Latency buckets in seconds, 0.5 ms to 10 s.
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

GIFT_ACK_SECONDS = Histogram(
    "giftstream_gift_ack_seconds", "From a gift frame read to its ack (or error reply) written", buckets=_LATENCY)
ROOM_DELIVERY_LAG_SECONDS = Histogram(
    "giftstream_room_delivery_lag_seconds", "From an event's publish time to its frame written to a room's sockets",
    buckets=_LATENCY)
JOIN_SECONDS = Histogram(
    "giftstream_join_seconds", "From a room socket accepted to its welcome sent", buckets=_LATENCY)
LUA_BATCH_CALLS = Histogram(
    "giftstream_lua_batch_calls", "Lua calls per pipeline sent to Redis",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000))
LUA_BATCH_SECONDS = Histogram(
    "giftstream_lua_batch_seconds", "Round trip of one Lua pipeline", buckets=_LATENCY)
SETTLE_BATCH_SECONDS = Histogram(
    "giftstream_settle_batch_seconds", "One settlement batch: SQL commit and outbox ack", buckets=_LATENCY)
SETTLE_LAG_SECONDS = Histogram(
    "giftstream_settle_lag_seconds", "From a movement made in Redis to its settlement committed", buckets=_LATENCY)
REPLY_ERRORS = Counter("giftstream_reply_errors", "Error replies sent on room sockets, by code", ["code"])
CLOSES = Counter("giftstream_closes", "Room sockets closed by the server, by close code", ["code"])
