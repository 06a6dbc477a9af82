"""One frozen settings object, built once from env vars and CLI flags."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "GIFTSTREAM_"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("./var")
    # None means "start the embedded valkey in data_dir".
    redis_url: str | None = None
    # None means "SQLite file in data_dir".
    database_url: str | None = None
    # None means "a random secret kept in data_dir/secret".
    secret: str | None = None
    workers: int = 1
    # User partitions: every wallet key carries the tag {p<k>}, k = crc32(user) % partitions.
    # Changing it on a live data set would move wallets: fixed per deployment.
    partitions: int = 16
    # Host share of gift coins, in basis points (5000 = 50%). Diamonds are kept in
    # units of 1/10000 so no share is ever rounded away.
    host_share_bp: int = 5000
    # Coalescing tick for busy rooms; a quiet room's event goes out at once.
    tick_ms: float = 20.0
    # Sockets a room's frame is written to before other work gets the loop (big rooms), at most;
    # fanout_slice_ms usually ends a slice first.
    pass_slice: int = 1000
    # Milliseconds of CPU one slice of a room's frame may take before other work gets the loop.
    # An ack takes several loop steps (the gift read, the Lua pipeline out, its reply, the
    # futures' callbacks), each of which can fall behind one slice, and every corked reply is
    # written before each slice. 5,000 viewers, 1,000 gifts/s (2026-11-30; a socket's write of
    # a frame costs ~19 us there): 1,000-socket slices (before) ack p99 431-946 ms in six runs;
    # 2 ms slices 150-202 ms (p50 40-54) in four; 1 ms 116 ms in one; 0.5 ms 79-195 ms (p50
    # 19-26) in six (docs/benchmarks.md). The extra loop steps cost little: the Python part of
    # a pass is ~1.3 us a socket.
    fanout_slice_ms: float = 0.5
    # Share of the loop's time one room's fan-out may take: a room whose frame cost B seconds to
    # write starts its next frame no sooner than B / share after that one began, so a very big
    # room lowers its frame rate instead of starving acks, Redis replies and joins (1.0: only
    # tick_ms limits it). 5,000 viewers, 1,000 gifts/s on two cores shared with the load client
    # (2026-11-30): at 0.6 the room runs 5-8 frames/s and every viewer keeps up; at 1.0 the
    # client fell behind and frames dropped to 1.5/s with deliveries 11 s late (one run); 0.8
    # did no better than 0.6 in the one clean run it had.
    fanout_share: float = 0.6
    # Socket writes per second one node's rooms may make together (shared over `serve --workers
    # N`'s processes); the rooms sending share it max-min fairly (rooms/budget.py), so a room of
    # S local sockets sends a frame at most every S / its share seconds: the frame rate follows
    # the room's size, before any pass has cost anything (fanout_share then only catches what
    # this misjudges). A socket's write of a small frame cost 10-17 us of gateway CPU in the
    # join storms of 2026-11-30 (loopback: the kernel's receive side is paid by the sender too):
    # 50,000 writes/s is 0.5-0.85 core of 2 (docs/benchmarks.md: the latency at each room size).
    fanout_writes_per_s: float = 50_000.0
    combo_window_s: float = 3.0
    resume_max_events: int = 10_000
    resume_max_age_s: int = 120
    # A charged gift is published to its room once, however often it is asked; asked again
    # (the sender's retry after a gateway died before publishing it, or a publish retried after
    # a Redis error) up to this long after its debit. Older ones are not published late. Redis
    # keeps a record per published gift this long (about 60 bytes each: 50 MB at 7,000/s).
    republish_window_s: int = 120
    # Unsent bytes a socket may hold before it is closed as a slow consumer.
    send_buffer_cap: int = 1 << 20
    # Kernel send buffer per room socket (SO_SNDBUF); 0 keeps the kernel's autotuning. A small
    # value bounds kernel memory per viewer and makes stalls visible to send_buffer_cap sooner.
    socket_sndbuf: int = 256 * 1024
    # Hand joined room sockets from uvicorn to a light protocol (rooms/takeover.py).
    takeover: bool = True
    # Take room sockets' plain upgrade requests below uvicorn (rooms/door.py; needs takeover):
    # handshake, auth and join in one pass, a known room joined with no Redis read. A join cost
    # ~2 ms of gateway CPU through uvicorn and Starlette (2026-11-30 join storms); 0 sends every
    # room socket the long way again.
    fast_join: bool = True
    # Pending connections the listening socket queues (the kernel caps it at net.core.somaxconn,
    # 4096 here). uvicorn's 2048 overflowed in a 5,000 joins/s storm: dropped SYNs came back 1 s
    # and 3 s later, and the join p99 went to 10 s.
    listen_backlog: int = 8192
    # Open files a gateway process keeps for other things than client connections (its Redis
    # pools, the bus, the ledger, logs, metric files): a connection past the soft limit less this
    # is refused with 503 (server/guard.py), and `serve` says its sockets per process from it.
    files_reserved: int = 300
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    gift_rate_per_s: float = 20.0
    gift_burst: int = 50
    max_frame_bytes: int = 64 * 1024
    # Resumes one socket may ask for: each replays up to resume_max_events from Redis (100
    # resumes of a 2,000-event room cost 2.6 s of gateway CPU and raised everyone's latency).
    # A client resumes once per reconnect; more is answered `rate_limited` and not run.
    resume_rate_per_s: float = 0.5
    resume_burst: int = 5
    # Application pings one socket may send; more are dropped unanswered (46,000 pings/s from
    # one socket raised another user's gift round trip from 2-4 ms to 16-43 ms).
    ping_rate_per_s: float = 2.0
    ping_burst: int = 10
    # Room sockets one user may hold on this node, in one room and in all (0: no cap). One token
    # opened 1,000 sockets in one room; a person needs a few (tabs, a phone).
    max_sockets_per_user_room: int = 8
    max_sockets_per_user: int = 64
    # Open connections (HTTP and WebSocket) per peer address on this node (0: no cap). Loopback
    # peers are exempt unless ip_cap_loopback: load tests and a local reverse proxy come from
    # 127.0.0.1 (behind a proxy every client shares its address: cap there instead).
    max_connections_per_ip: int = 1000
    ip_cap_loopback: bool = False
    # An HTTP request's head (request line and headers) may be this large and take this long to
    # arrive; past either the connection is refused (431) or dropped. httptools alone took an
    # 8 MB header and kept 300 silent and slowloris connections open indefinitely.
    http_max_header_bytes: int = 64 * 1024
    http_header_timeout_s: float = 10.0
    # An idle kept-alive HTTP connection is closed after this long (uvicorn's timeout_keep_alive).
    http_idle_timeout_s: float = 5.0
    # How long a charged gift id is remembered: a retry with that id inside it is answered with the
    # first result, one after it is charged as a new gift. It must outlive every retry: the client
    # library resends for at most 30 minutes (client_demo/state.py, GIFT_MAX_AGE_S) and its
    # reconnects give up after ~2 minutes of failures; a gateway restart with everyone reconnecting
    # takes seconds to a minute; a retry is shown in its room only up to republish_window_s (2
    # minutes) anyway. An hour holds all of those with room to spare. A gift is a live action, not
    # a payment call that a server may retry for a day, and each remembered gift costs Redis ~98
    # bytes (docs/scaling.md): an hour is 0.35 GB at 1,000 gifts/s and 7 GB at 20,000; 24 hours
    # (before 2026-11-30) was 13.5 GB at 1,000 gifts/s with the record of then, 8.4 with this one.
    idempotency_ttl_s: int = 3600
    max_gift_count: int = 9999
    # Lua pipelines in flight to Redis at once. Calls made while they are all out wait and
    # leave together in the next one (group commit): under load batches grow instead of the
    # number of round trips, so Redis does fewer reads, writes and AOF fsyncs per gift. One
    # beat two in a 5,000 gifts/s storm: gateway CPU 33% vs 36%, ack p99 15 vs 21 ms.
    redis_inflight: int = 1
    # Cluster mode (docs/cluster.md): a Lua pipeline's replies wait until this many replicas of
    # each primary it wrote to hold its writes (WAIT, one per node per pipeline, not per gift),
    # so a failover after a kill -9 of a primary cannot lose an acknowledged debit. Capped by
    # the replicas a primary has (none: no wait). A replica that does not answer within
    # cluster_replica_wait_ms does not stop gifts: the replies go out, the lag is logged once as
    # an outage, and that primary's pipelines do not wait for the next second (a failover then
    # may lose those writes).
    cluster_replica_acks: int = 1
    cluster_replica_wait_ms: int = 100
    settler: bool = True
    settle_batch: int = 8000
    # A settler that read less than a full batch waits this long before reading again. At 6,000
    # gifts/s, 150 rather than 50 took the settler from ~35% to ~22% of a core, for ~130 ms more
    # settlement lag (p99 ~250 ms).
    settle_linger_ms: float = 150.0
    # Pending outbox entries idle this long are claimed from a dead settler.
    settle_claim_idle_ms: int = 30_000
    migrate_on_start: bool = True
    presence_interval_s: float = 1.0
    node_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    token_ttl_s: int = 7 * 24 * 3600
    # A raised or removed monthly budget applies this long after it was asked for (lowering applies
    # at once), as card spending limits do: a moment's impulse cannot lift its own brake.
    budget_raise_delay_s: int = 24 * 3600
    # Reward points: what one daily check-in earns, and the redemption rate (rate_points points
    # make rate_coins coins; a redemption must be a whole multiple of rate_points).
    check_in_points: int = 10
    reward_rate_points: int = 100
    reward_rate_coins: int = 1
    # A recharge order with no outcome from the provider this long after it was made is expired
    # (a success arriving later is still credited: the money was taken).
    payment_expiry_s: int = 1800
    # The sandbox payment provider's driver (POST /v1/sandbox/payments/...): on for laptops, tests
    # and demos; GIFTSTREAM_SANDBOX=0 turns it off where real money moves.
    sandbox: bool = True
    # HMAC key of payment webhooks; None means "a random secret kept in data_dir/webhook_secret",
    # like `secret`, so every node and worker on one data dir shares it.
    webhook_secret: str | None = None
    # The creator side (issue 12). A host's diamond is worth this many thousandths of a cent
    # (500: half a cent, a host's 50% share of a 1-cent coin); a payout's amount_cents is
    # diamonds * this / 1000, exact: a withdrawal of diamonds not worth whole cents is refused.
    diamond_millicents: int = 500
    # A withdrawal must ask for at least this many diamonds, and a host may withdraw at most
    # this many in a UTC day (pending and paid withdrawals count; failed ones do not).
    withdraw_min_diamonds: int = 10_000
    withdraw_daily_max_diamonds: int = 1_000_000
    # A refunded or disputed recharge holds the diamonds its coins earned in gifts sent up to this
    # long after it was credited; older gifts' diamonds are the host's to keep.
    hold_window_s: int = 30 * 24 * 3600
    # Wrong 2FA codes a host may send in 15 minutes before withdrawals answer rate_limited.
    totp_max_failures: int = 5
    # A live room whose host has had no socket in it this long ends by itself.
    room_idle_end_s: int = 300
    # A LIVE goal's progress is pushed to its room at most this often (its completion at once).
    goal_event_interval_ms: int = 1000
    log_level: str = "info"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "giftstream.sqlite3"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.sqlite_path}"

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def _convert(name: str, raw: str) -> Any:
    """An env var's text as the field's type, read off the field's default (bool, int, float,
    Path); anything else is text, empty meaning unset. No list of names to keep in step with the
    fields: a new field converts by its default."""
    default = Settings.__dataclass_fields__[name].default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int | float | Path):
        return type(default)(raw)
    return raw or None


def from_env(env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
    """Env vars (GIFTSTREAM_<FIELD>) first, then CLI flags that were given (not None)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name in Settings.__dataclass_fields__:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _convert(name, raw)
    for name, value in flags.items():
        if value is not None:
            values[name] = Path(value) if name == "data_dir" else value
    return Settings(**values)


def to_env(settings: Settings) -> dict[str, str]:
    """The env vars that rebuild these settings in a worker process."""
    out: dict[str, str] = {}
    for name in Settings.__dataclass_fields__:
        value = getattr(settings, name)
        if value is None or name == "node_id":
            continue
        if isinstance(value, bool):
            value = "1" if value else "0"
        out[ENV_PREFIX + name.upper()] = str(value)
    return out


def load_or_create_secret(data_dir: Path, name: str = "secret") -> str:
    """The secret shared by `serve` and `token` when none is configured (`name`: its file)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    secret = secrets.token_urlsafe(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    try:
        os.link(tmp, path)  # first writer wins when two processes race
    except FileExistsError:
        pass
    tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def resolve_secret(settings: Settings) -> Settings:
    """The token secret and the webhook secret, each from the data dir when not configured."""
    if not settings.secret:
        settings = settings.with_(secret=load_or_create_secret(settings.data_dir))
    if not settings.webhook_secret:
        settings = settings.with_(webhook_secret=load_or_create_secret(settings.data_dir, "webhook_secret"))
    return settings
