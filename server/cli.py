"""`giftstream serve | token | audit | settle | migrate | dev-cluster`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import json
import logging
import logging.config
import os
import re
import shlex
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from server import auth, embedded
from server.settings import Settings, from_env, resolve_secret, to_env

log = logging.getLogger("giftstream")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where the embedded valkey, SQLite and the secret live (./var)")
    p.add_argument("--redis-url", help="use this Redis/Valkey instead of the embedded one")
    p.add_argument("--database-url", help="sqlite:///path or postgresql://... (default SQLite in the data dir)")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    """`serve`'s settings: its data dir is made when missing, and keeps the token secret."""
    flags = {k: getattr(args, k, None) for k in ("data_dir", "redis_url", "database_url")}
    flags.update(extra)
    settings = from_env(**flags)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return resolve_secret(settings)


def _refuse(sentence: str) -> None:
    """A command that cannot do what was asked: one sentence, exit 2."""
    print(f"giftstream: {sentence}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _tool_settings(args: argparse.Namespace, *, redis: bool, ledger: bool, secret: bool = False) -> Settings:
    """Settings of a command that works beside `serve` (token, audit, settle, migrate, rebuild).

    It uses that serve's data dir and never makes one: a data dir made here would hold a fresh
    secret, ledger and valkey, so an audit would pass on nothing and a token would be signed
    with a secret no server knows. A missing data dir that the command would use (for the
    embedded valkey, the SQLite ledger or the secret) is refused with exit 2."""
    flags = {k: getattr(args, k, None) for k in ("data_dir", "redis_url", "database_url")}
    settings = from_env(**flags)
    settings = settings.with_(data_dir=settings.data_dir.resolve())
    uses = [what for what, used in (("the embedded valkey's address", redis and not settings.redis_url),
                                    ("the SQLite ledger", ledger and not settings.database_url),
                                    ("the token secret", secret and not settings.secret)) if used]
    if uses and not settings.data_dir.is_dir():
        _refuse(f"data dir {settings.data_dir} does not exist (it would hold {' and '.join(uses)}): run "
                f"`giftstream {args.command}` where `giftstream serve` runs, or pass that serve's --data-dir.")
    return resolve_secret(settings) if secret else settings


def _tell(command: str, settings: Settings, redis_source: str | None = None) -> None:
    """Which data dir and servers a command uses, on stderr (stdout stays its output)."""
    parts = [f"data dir {settings.data_dir}"]
    if redis_source is not None:
        parts.append(f"redis {_safe_url(settings.redis_url or '')} ({redis_source})")
    parts.append(f"ledger {_safe_url(settings.effective_database_url)}")
    print(f"giftstream {command}: " + ", ".join(parts), file=sys.stderr, flush=True)


def _safe_url(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


def _with_redis(settings: Settings, start_if_missing: bool) -> tuple[Settings, embedded.Embedded | None, str]:
    """The configured Redis, or the embedded valkey of this data dir (running, or started now),
    and where it came from."""
    if settings.redis_url:
        return settings, None, "--redis-url"
    running = embedded.find_running(settings.data_dir)
    if running is not None:
        return settings.with_(redis_url=running.url), None, "the valkey of the serve running on this data dir"
    if not start_if_missing:
        _refuse(f"no valkey is running for data dir {settings.data_dir}: start `giftstream serve` there first, "
                "or pass --redis-url.")
    emb = embedded.start(settings.data_dir)
    return settings.with_(redis_url=emb.url), emb, "embedded valkey started for this command, no serve is running"


class _RedactTokens(logging.Filter):
    """Socket paths carry the token in their query string (uvicorn logs them): keep tokens out
    of every log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = _redact(record.msg)
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(_redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def _redact(text: str) -> str:
    return re.sub(r"token=[^&\s\"]+", "token=<redacted>", text)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_config(level: str = "info") -> dict[str, Any]:
    """One format for every line (ours and uvicorn's: its access line per HTTP request, its
    line per socket handshake), tokens redacted; `serve --workers N` passes it to each worker."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": "server.cli._RedactTokens"}},
        "formatters": {"plain": {"format": LOG_FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["redact"],
                                "stream": "ext://sys.stderr"}},
        "loggers": {name: {"handlers": [], "level": level.upper(), "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
        "root": {"handlers": ["stderr"], "level": level.upper()},
    }


def _check_port(host: str, port: int) -> None:
    """A busy port is said in one sentence before anything starts (not a bind traceback)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        _refuse(f"cannot listen on {host}:{port}: {exc.strerror or exc}.")
        return
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As uvicorn binds: a port held only by connections in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                _refuse(f"port {port} on {host} is already in use (another `giftstream serve`?); "
                        f"pick another one with --port {port + 1}.")
            _refuse(f"cannot listen on {host}:{port}: {exc.strerror or exc}.")


# Open files a gateway process keeps for other things than room sockets: its listening socket,
# two Redis pools of up to 64 connections each, the bus, wallet-event and fast-pipe connections,
# the ledger, log and metric files, epoll and uvloop's own. The rest may be sockets (the
# default of settings.files_reserved, which guard.py refuses connections past).
FILES_RESERVED = Settings.files_reserved


def raise_open_files() -> int:
    """Lift this process's soft open-files limit to the hard one (worker processes inherit it) and
    return it. Every socket is a file: the limit, not memory, is what caps a process's sockets."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def socket_capacity(open_files: int, workers: int, reserved: int = FILES_RESERVED) -> str:
    """`serve`'s line at start: how many sockets this node can hold, per worker and in all."""
    per_worker = max(0, open_files - reserved)
    workers = max(1, workers)
    where = "one process" if workers == 1 else f"{workers} workers"
    return (f"open files limit {open_files} per process: up to {per_worker:,} sockets per process, "
            f"{per_worker * workers:,} in all ({where}; more take --workers)")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server import metrics
    from server.app import create_app
    from server.guard import FirstBytes, GuardedWebSocketProtocol

    settings = _settings(args, host=args.host, port=args.port, workers=args.workers,
                         settler=False if args.no_settler else None)
    _check_port(settings.host, settings.port)
    log.info("giftstream serve: %s", socket_capacity(raise_open_files(), settings.workers, settings.files_reserved))
    # A serve already running on this data dir: this one shares its valkey (and ledger).
    owner = None if settings.redis_url else embedded.owner(settings.data_dir)
    emb = None
    if not settings.redis_url:
        emb = embedded.start(settings.data_dir)
        emb.supervise()  # a valkey that dies is started again from its AOF (embedded.Supervisor)
        settings = settings.with_(redis_url=emb.url)
    if owner is not None:
        log.warning("data dir %s belongs to a running `giftstream serve` (pid %d): joining that node's valkey "
                    "(%s) as a second gateway on port %d. For a node of its own, stop that serve or pass "
                    "another --data-dir.", settings.data_dir.resolve(), owner, settings.redis_url, settings.port)
    common: dict[str, Any] = dict(
        host=settings.host, port=settings.port, loop="uvloop",
        ws_max_size=settings.max_frame_bytes, ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.ping_timeout_s, ws_per_message_deflate=False, lifespan="on",
        # one format, tokens redacted, an access line per HTTP request (see log_config)
        log_config=log_config(settings.log_level),
        log_level=settings.log_level, timeout_graceful_shutdown=30, access_log=True,
        # uvicorn's httptools and websockets-sansio protocols with the limits they lack
        # (server/guard.py): a request head's size and time, connections per address, pongs
        # within the send-buffer cap. A connection's first bytes are read by FirstBytes: a room
        # socket's request goes to the fast door, anything else to the httptools protocol.
        http=FirstBytes, ws=GuardedWebSocketProtocol, timeout_keep_alive=settings.http_idle_timeout_s,
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
        # Connections the kernel may hold for accept: after a gateway restart every viewer comes
        # back at once, and a full queue drops SYNs, which a client retries 1 s, then 3 s later.
        backlog=settings.listen_backlog,
        # Under --workers N, a worker that does not answer the supervisor's ping in time is killed
        # (and with it every socket it holds). uvicorn's 5 s was missed by busy workers of a 50,000
        # viewer join storm on two loaded cores: two of four were killed at start.
        timeout_worker_healthcheck=30,
    )
    try:
        if settings.workers > 1:
            os.environ.update(to_env(settings))
            # Before the workers start (and import prometheus-client): their metrics go to files
            # there, and whichever worker is scraped sums them all.
            metrics.prepare_multiprocess(settings.data_dir, settings.port)
            uvicorn.run("server.cli:worker_app", factory=True, workers=settings.workers, **common)
        else:
            app = create_app(settings, emb)
            config = uvicorn.Config(app, **common)
            server = DrainingServer(config)
            server.demo_settings = None if args.no_demo else settings
            server.run()
    finally:
        if emb is not None:
            emb.stop()
    return 0


def worker_app() -> Any:
    """A `serve --workers N` worker: the app from GIFTSTREAM_* env, writing its node's figures
    for /metrics while it serves."""
    from server import metrics
    from server.app import create_app_from_env

    app = create_app_from_env()
    serve = app.router.lifespan_context
    node = app.state.node

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with serve(app), metrics.worker_figures(node):
            yield

    app.router.lifespan_context = lifespan
    return app


def _make_server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """SIGTERM: stop accepting, finish in-flight debits, close sockets with 1001, then uvicorn's shutdown."""

        demo_settings: Settings | None = None

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.demo_settings is not None and not self.should_exit:
                await print_demo(self.config.app, self.demo_settings)

        async def shutdown(self, sockets: Any = None) -> None:
            for srv in self.servers:
                srv.close()
            app: Any = self.config.app
            node = app.state.node
            sockets_open = node.hub.connections()
            try:
                await asyncio.wait_for(node.drain(), 20)
            except Exception:
                log.warning("drain did not finish cleanly", exc_info=True)
            await super().shutdown(sockets)
            log.info("shutdown: %d room sockets closed with 1001 (resume advised), %d movements settled by "
                     "this node's settler, %s", sockets_open, node.settler.settled, _valkey_fate(node))

    return Server


def DrainingServer(config: Any) -> Any:
    return _make_server_class()(config)


def _valkey_fate(node: Any) -> str:
    emb = node.embedded
    if emb is None:
        return "Redis left running (not ours)"
    if not emb.owned:
        return "embedded valkey left running for the serve that owns it"
    return "embedded valkey stopped"


async def print_demo(app: Any, settings: Settings) -> None:
    """A demo room, two tokens and the next steps, each a command to paste as it is."""
    node = app.state.node
    secret = settings.secret or ""
    host = auth.issue(secret, "demo_host", role="host", name="Demo Host", ttl_s=settings.token_ttl_s)
    viewer = auth.issue(secret, "demo_viewer", role="viewer", name="Demo Viewer", ttl_s=settings.token_ttl_s)
    room_id = "demo"
    # Live at every start, and never ended for idleness (rooms/lifecycle.py).
    await node.lifecycle.reopen(room_id, "demo_host", "Demo Host", "Demo LIVE")
    print(banner(settings, room_id, host, viewer), flush=True)


def banner(settings: Settings, room_id: str, host_token: str, viewer_token: str) -> str:
    # A server listening on every address is reached on this machine at 127.0.0.1.
    addr = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    base = f"http://{addr}:{settings.port}"
    python = shlex.quote(sys.executable)
    giftstream = Path(sys.executable).with_name("giftstream")
    cli = shlex.quote(str(giftstream)) if giftstream.exists() else f"{python} -m server.cli"
    data_dir = shlex.quote(str(settings.data_dir.resolve()))
    client = f"{python} -m client_demo"
    steps = [
        (f"{client} recharge --token \"$GIFTSTREAM_VIEWER_TOKEN\" --package coins_65", "buy 65 coins"),
        (f"{client} host --room {room_id} --token \"$GIFTSTREAM_HOST_TOKEN\"", "feed, totals, top gifters"),
        (f"{client} viewer --room {room_id} --token \"$GIFTSTREAM_VIEWER_TOKEN\"", "a key per gift"),
        (f"{client} gift --room {room_id} --token \"$GIFTSTREAM_VIEWER_TOKEN\" --gift rose --count 5", "5 roses"),
        (f"{cli} audit --data-dir {data_dir}", "coins add up"),
        (f"{cli} token alice --name Alice --data-dir {data_dir}", "another viewer"),
    ]
    width = max(len(command) for command, _ in steps)
    return "\n".join([
        "",
        f"Giftstream is live at {base}  (data dir {settings.data_dir.resolve()})",
        f"  room {room_id!r}, hosted by Demo Host; a viewer token for Demo Viewer",
        "",
        "Open the live room in a browser, as the host and as the viewer:",
        f"  {base}/demo?room={room_id}&token={host_token}",
        f"  {base}/demo?room={room_id}&token={viewer_token}",
        "",
        "Or in terminals: paste this line in each new terminal first",
        f"  export GIFTSTREAM_URL={base} GIFTSTREAM_HOST_TOKEN={host_token} GIFTSTREAM_VIEWER_TOKEN={viewer_token}",
        "then:",
        *(f"  {command.ljust(width)}  # {what}" for command, what in steps),
        "",
    ])


def cmd_token(args: argparse.Namespace) -> int:
    settings = _tool_settings(args, redis=False, ledger=False, secret=True)
    running = embedded.find_running(settings.data_dir)
    source = "$GIFTSTREAM_SECRET" if os.environ.get("GIFTSTREAM_SECRET") else f"the secret in {settings.data_dir}"
    served = ("the serve running on it accepts it" if running is not None
              else "no serve is running on it now: a serve started on it accepts it")
    print(f"giftstream token: data dir {settings.data_dir}, signed with {source}; {served}",
          file=sys.stderr, flush=True)
    print(auth.issue(settings.secret or "", args.user_id, role=args.role, name=args.name,
                     birthdate=args.birthdate, ttl_s=args.ttl or settings.token_ttl_s))
    return 0


def _run_with_store(command: str, settings: Settings, fn: Callable[[Settings, Any, Any], Awaitable[int]],
                    start_redis: bool = True) -> int:
    settings, emb, source = _with_redis(settings, start_if_missing=start_redis)
    _tell(command, settings, source)

    async def main() -> int:
        from server.node import redis_client
        from server.store import open_store

        # A cluster client for redis+cluster:// URLs.
        redis = redis_client(settings.redis_url or "", decode=True)
        store = open_store(settings.effective_database_url)
        try:
            if settings.migrate_on_start:
                await store.migrate()
            return await fn(settings, redis, store)
        finally:
            await store.close()
            await redis.aclose()

    try:
        return asyncio.run(main())
    finally:
        if emb is not None:
            emb.stop()


def cmd_audit(args: argparse.Namespace) -> int:
    from server.settlement.audit import run_audit

    settings = _tool_settings(args, redis=True, ledger=True)

    async def audit(settings: Settings, redis: Any, store: Any) -> int:
        report = await run_audit(redis, store, settings.partitions)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            t, w, d = report["totals"], report["wallets"], report["diamonds"]
            print(f"movements {t['movements']} (unsettled {t['unsettled']}), coins credited {t['coins_credited']}, "
                  f"spent {t['coins_spent']}; {w['wallets']} wallets hold {w['wallet_balances']}; "
                  f"{d['gifts']} gifts settled, host diamond units {d['host_diamond_units']}")
            h = report["hosts"]
            print(f"hosts checked {h['hosts']}, each: lifetime = available + held + reserved + paid out (units, in "
                  f"all: held {h['held_units']}, reserved {h['reserved_units']}, paid out {h['paid_units']})")
            for f in report["failures"]:
                print("FAIL:", f)
            print("audit ok" if report["ok"] else "audit FAILED")
        return 0 if report["ok"] else 1

    return _run_with_store("audit", settings, audit)


def cmd_rebuild(args: argparse.Namespace) -> int:
    from server.settlement.rebuild import rebuild_wallets

    settings = _tool_settings(args, redis=True, ledger=True)

    async def rebuild(settings: Settings, redis: Any, store: Any) -> int:
        report = await rebuild_wallets(redis, store, settings.partitions, dry_run=args.dry_run)
        print(json.dumps(report, indent=2, default=str))
        return 0

    return _run_with_store("rebuild-wallets", settings, rebuild)


def cmd_migrate(args: argparse.Namespace) -> int:
    from server.store import open_store

    settings = _tool_settings(args, redis=False, ledger=True)
    _tell("migrate", settings)

    async def main() -> int:
        store = open_store(settings.effective_database_url)
        try:
            version = await store.migrate()
        finally:
            await store.close()
        print(f"schema at version {version}")
        return 0

    return asyncio.run(main())


def cmd_settle(args: argparse.Namespace) -> int:
    import signal
    import socket

    from server.settlement.settler import Settler

    settings = _tool_settings(args, redis=True, ledger=True)

    async def settle(settings: Settings, redis: Any, store: Any) -> int:
        if args.requeue:
            from server.settlement.outbox import requeue

            moved = await requeue(redis, settings.partitions)
            print(f"moved {moved} quarantined movements back to the outbox", flush=True)
            return 0
        settler = Settler.from_settings(
            redis, store, settings, consumer=args.consumer or f"{socket.gethostname()}:settle:{os.getpid()}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        settler.start()
        gc.freeze()  # as `serve` does: what start-up made stays out of full collections
        print(f"settler {settler.consumer} running", flush=True)
        await stop.wait()
        await settler.stop(flush=False)
        print(f"settled {settler.settled} movements", flush=True)
        return 0

    return _run_with_store("settle", settings, settle, start_redis=False)


def cmd_dev_cluster(args: argparse.Namespace) -> int:
    """A local Valkey Cluster in the foreground (server/devcluster.py) until Ctrl-C or SIGTERM."""
    import signal
    import threading

    from server import devcluster

    settings = from_env(data_dir=args.data_dir)
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        cluster = devcluster.start(data_dir, primaries=args.primaries, replicas=args.replicas)
    except (RuntimeError, ValueError) as exc:
        _refuse(f"the cluster did not start: {exc}")
        return 2
    cluster.supervise()  # a node that dies is started again (it rejoins as a replica when failed over)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("\n".join([
        f"Valkey Cluster: {cluster.primaries} primaries, {cluster.replicas} replica(s) each, data in {data_dir}",
        f"  {cluster.url}",
        "Point every gateway and settler at it: paste this line in their terminals first",
        f"  export GIFTSTREAM_REDIS_URL={cluster.url}",
        "Ctrl-C stops the cluster (its data stays: the same command brings it back).",
        "",
    ]), flush=True)
    try:
        stop.wait()
    finally:
        cluster.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="giftstream", description="Live-stream gifting server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (HTTP + WebSocket rooms) and the settler")
    _common(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="processes sharing the port")
    serve.add_argument("--no-settler", action="store_true", help="leave settlement to `giftstream settle`")
    serve.add_argument("--no-demo", action="store_true", help="do not create the demo room or print tokens")
    serve.set_defaults(fn=cmd_serve)

    token = sub.add_parser("token", help="print a signed token")
    _common(token)
    token.add_argument("user_id")
    token.add_argument("--role", default="viewer", choices=auth.ROLES)
    token.add_argument("--name")
    token.add_argument("--birthdate", default="1990-01-01", help="YYYY-MM-DD")
    token.add_argument("--ttl", type=int, help="seconds until it expires")
    token.set_defaults(fn=cmd_token)

    audit = sub.add_parser("audit", help="check conservation of coins across Redis and the ledger")
    _common(audit)
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(fn=cmd_audit)

    settle = sub.add_parser("settle", help="run a standalone settler")
    _common(settle)
    settle.add_argument("--consumer", help="consumer name in the settlers group")
    settle.add_argument("--requeue", action="store_true",
                        help="move movements set aside after a permanent settlement error back to the outbox, "
                             "then exit")
    settle.set_defaults(fn=cmd_settle)

    rebuild = sub.add_parser("rebuild-wallets",
                             help="recompute every Redis wallet from the ledger and the unsettled outbox")
    _common(rebuild)
    rebuild.add_argument("--dry-run", action="store_true", help="report what would change, change nothing")
    rebuild.set_defaults(fn=cmd_rebuild)

    cluster = sub.add_parser("dev-cluster", help="run a local Valkey Cluster (for trying cluster mode) and print "
                                                  "its redis+cluster:// URL")
    cluster.add_argument("--primaries", type=int, default=3)
    cluster.add_argument("--replicas", type=int, default=1, help="replicas of each primary")
    cluster.add_argument("--data-dir", help="where the nodes keep their data (./var)")
    cluster.set_defaults(fn=cmd_dev_cluster)

    migrate = sub.add_parser("migrate", help="apply schema migrations")
    _common(migrate)
    migrate.set_defaults(fn=cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.config.dictConfig(log_config())
    try:
        import uvloop

        uvloop.install()
    except Exception:  # uvloop is optional for the CLI; serve uses it through uvicorn
        pass
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: serve has drained and stopped by now; no traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())
