"""Prometheus metrics: what operators page on, as histograms and counters.

Every metric is defined here, once; the code that measures imports the object and
observes it. `/metrics` renders the default registry (or, under `serve --workers N`,
every worker's values through prometheus-client's multiprocess mode), plus figures
read at scrape time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

if TYPE_CHECKING:
    from server.node import Node

# Latency buckets in seconds, 0.5 ms to 10 s.
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

GIFT_ACK_SECONDS = Histogram(
    "giftstream_gift_ack_seconds", "From a gift frame read to its ack (or error reply) written", buckets=_LATENCY)
# One observation per frame pass (never per socket), for the frame's oldest event.
ROOM_DELIVERY_LAG_SECONDS = Histogram(
    "giftstream_room_delivery_lag_seconds",
    "From an event's time (a gift's debit) to its frame written to all of a room's local sockets; "
    "once per frame, its oldest event", buckets=_LATENCY)
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


# --- Figures read at scrape time -----------------------------------------------------------------
#
# Per-node counts the hot path already keeps as plain ints (a frame pass, a pipeline): they are
# read when /metrics is scraped, so measuring them adds nothing per socket or per event.


class Figure(NamedTuple):
    """One value exposed as read at scrape time."""

    # Counters end in `_total`, as prometheus-client writes them.
    name: str
    help: str
    kind: Literal["gauge", "counter"]
    value: float


class NodeFigure(NamedTuple):
    """A per-node value and how to read it off the node."""

    name: str
    help: str
    kind: Literal["gauge", "counter"]
    read: Callable[[Node], float]
    # How `serve --workers N` combines a gauge over the workers (live ones only).
    mode: Literal["livesum", "livemax"] = "livesum"


@functools.cache
def node_figures_read() -> tuple[NodeFigure, ...]:
    """What is read off a node (in a function, so the type checker reads it after `Node`: the
    node's modules import this one)."""
    return (
        NodeFigure("giftstream_settled_total", "Movements settled by this node", "counter",
                   lambda n: n.settler.settled),
        NodeFigure("giftstream_settle_batches_total", "Settlement batches committed by this node", "counter",
                   lambda n: n.settler.batches),
        NodeFigure("giftstream_settle_failures_total", "Settlement attempts that failed", "counter",
                   lambda n: n.settler.failures),
        NodeFigure("giftstream_settler_degraded", "1 while settlement is failing and retrying", "gauge",
                   lambda n: int(n.settler.degraded), "livemax"),
        NodeFigure("giftstream_connections", "Open room sockets on this node", "gauge",
                   lambda n: n.hub.connections()),
        NodeFigure("giftstream_rooms", "Rooms with local viewers on this node (per worker process)", "gauge",
                   lambda n: len(n.hub.rooms)),
        NodeFigure("giftstream_room_events_total", "Room events received by this node", "counter",
                   lambda n: n.hub.events),
        NodeFigure("giftstream_room_frames_total", "Coalesced event frames encoded", "counter",
                   lambda n: n.hub.frames),
        NodeFigure("giftstream_room_deliveries_total", "Event deliveries to sockets", "counter",
                   lambda n: n.hub.deliveries),
        NodeFigure("giftstream_debit_batches_total", "Lua pipelines sent", "counter",
                   lambda n: n.batcher.batches),
        NodeFigure("giftstream_debit_calls_total", "Lua calls sent in pipelines", "counter",
                   lambda n: n.batcher.calls),
        NodeFigure("giftstream_bus_reconnects_total", "Room bus reconnections (each followed by a catch-up)",
                   "counter", lambda n: n.bus.reconnects),
        NodeFigure("giftstream_cluster_redirects_total", "MOVED and ASK replies the Lua pipeline followed (cluster)",
                   "counter", lambda n: getattr(n.fastpipe, "redirects", 0)),
        NodeFigure("giftstream_cluster_slot_map_reads_total", "Slot maps the Lua pipeline read (cluster: at start, "
                   "then after each MOVED, lost node or failover)", "counter",
                   lambda n: getattr(getattr(n.fastpipe, "map", None), "refreshes", 0)),
        NodeFigure("giftstream_keepalive_dropped_total", "Sockets dropped for not answering pings", "counter",
                   lambda n: n.keepalive.dropped),
    )


class _Figures:
    """A collector of figures read just before."""

    def __init__(self, figures: Iterable[Figure]) -> None:
        self.figures = list(figures)

    def collect(self) -> Iterator[Metric]:
        for f in self.figures:
            if f.kind == "counter":
                yield CounterMetricFamily(f.name, f.help, value=f.value)
            else:
                yield GaugeMetricFamily(f.name, f.help, value=f.value)


def node_figures(node: Node) -> list[Figure]:
    return [Figure(f.name, f.help, f.kind, float(f.read(node))) for f in node_figures_read()]


def exposition(node: Node, scraped: Iterable[Figure]) -> bytes:
    """The /metrics body: every metric above plus the node's figures and `scraped` (global
    figures the caller read from Redis just now, reported once, not summed over workers)."""
    extra = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path is None:
        extra.register(_Figures([*node_figures(node), *scraped]))
        return generate_latest(REGISTRY) + generate_latest(extra)
    extra.register(_Figures(scraped))
    _worker_figures().write(node)  # this worker's figures exact; the others' at most a second old
    reap_dead_workers(path)
    every_worker = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(every_worker, path)  # type: ignore[no-untyped-call]
    return generate_latest(every_worker) + generate_latest(extra)


# --- Multiprocess mode (`serve --workers N`) -----------------------------------------------------
#
# Each worker writes its values to files of its own under PROMETHEUS_MULTIPROC_DIR (prometheus-
# client picks that mode at import when the variable is set: `serve` sets it before it starts the
# workers), and whichever worker is scraped sums every worker's files. A worker's plain-int
# figures reach its files through a sampler, once a second, since another worker cannot read them.

# The variable is prometheus-client's own, read by it at import: not a Giftstream setting.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# How often a worker writes its node figures for the others' scrapes.
SAMPLE_INTERVAL_S = 1.0


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV)


def prepare_multiprocess(data_dir: Path, port: int) -> Path:
    """Before the workers start: a fresh, empty directory for this port's workers' metric files
    (a second `serve` on the same data dir has its own port, and its own directory)."""
    path = data_dir / f"metrics-{port}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


class _WorkerFigures:
    """This worker's node figures as multiprocess metrics (unregistered: read from the files)."""

    def __init__(self) -> None:
        self.metrics: list[tuple[NodeFigure, Counter | Gauge]] = [
            (f, Counter(f.name.removesuffix("_total"), f.help, registry=None) if f.kind == "counter"
             else Gauge(f.name, f.help, registry=None, multiprocess_mode=f.mode))
            for f in node_figures_read()]
        self.written: dict[str, float] = {}

    def write(self, node: Node) -> None:
        for f, metric in self.metrics:
            value = float(f.read(node))
            if isinstance(metric, Gauge):
                metric.set(value)
            elif value > (before := self.written.get(f.name, 0.0)):
                metric.inc(value - before)
            self.written[f.name] = value


@functools.cache
def _worker_figures() -> _WorkerFigures:
    return _WorkerFigures()


def reap_dead_workers(path: str) -> None:
    """Drop the live gauges of workers that are gone (crashed, or restarted by uvicorn), as
    prometheus-client asks (`mark_process_dead`); their counters stay in the sums."""
    pids = {int(name.rsplit("_", 1)[1].removesuffix(".db"))
            for name in os.listdir(path) if name.startswith("gauge_live")}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, another user's


@contextlib.asynccontextmanager
async def worker_figures(node: Node) -> AsyncIterator[None]:
    """While a worker serves: write its node figures every second; when it stops, withdraw its
    live gauges."""

    async def sample() -> None:
        while True:
            _worker_figures().write(node)
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    task = asyncio.get_running_loop().create_task(sample(), name="giftstream-metrics")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        path = multiprocess_dir()
        if path is not None:
            mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]
