"""`giftstream serve | token | audit | settle | migrate`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from server import auth, embedded
from server.settings import Settings, from_env, resolve_secret, to_env

log = logging.getLogger("giftstream")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where the embedded valkey, SQLite and the secret live (./var)")
    p.add_argument("--redis-url", help="use this Redis/Valkey instead of the embedded one")
    p.add_argument("--database-url", help="sqlite:///path or postgresql://... (default SQLite in the data dir)")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    flags = {k: getattr(args, k, None) for k in ("data_dir", "redis_url", "database_url")}
    flags.update(extra)
    settings = from_env(**flags)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return resolve_secret(settings)


def _with_redis(settings: Settings, start_if_missing: bool) -> tuple[Settings, embedded.Embedded | None]:
    """The configured Redis, or the embedded valkey of this data dir (running, or started now)."""
    if settings.redis_url:
        return settings, None
    running = embedded.find_running(settings.data_dir)
    if running is not None:
        return settings.with_(redis_url=running.url), None
    if not start_if_missing:
        raise SystemExit("no Redis URL given and no embedded valkey running for this data dir")
    emb = embedded.start(settings.data_dir)
    return settings.with_(redis_url=emb.url), emb


class _RedactTokens(logging.Filter):
    """uvicorn logs socket paths with their query string: keep tokens out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(_redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def _redact(text: str) -> str:
    import re

    return re.sub(r"token=[^&\s\"]+", "token=<redacted>", text)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server import metrics
    from server.app import create_app
    from server.guard import GuardedHttpProtocol, GuardedWebSocketProtocol

    settings = _settings(args, host=args.host, port=args.port, workers=args.workers,
                         settler=False if args.no_settler else None)
    emb = None
    if not settings.redis_url:
        emb = embedded.start(settings.data_dir)
        emb.supervise()  # a valkey that dies is started again from its AOF (embedded.Supervisor)
        settings = settings.with_(redis_url=emb.url)
    common: dict[str, Any] = dict(
        host=settings.host, port=settings.port, loop="uvloop",
        ws_max_size=settings.max_frame_bytes, ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.ping_timeout_s, ws_per_message_deflate=False, lifespan="on",
        log_level=settings.log_level, timeout_graceful_shutdown=30, access_log=False,
        # uvicorn's httptools and websockets-sansio protocols with the limits they lack
        # (server/guard.py): a request head's size and time, connections per address, pongs
        # within the send-buffer cap.
        http=GuardedHttpProtocol, ws=GuardedWebSocketProtocol, timeout_keep_alive=settings.http_idle_timeout_s,
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
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
            logging.getLogger("uvicorn.error").addFilter(_RedactTokens())
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
            try:
                await asyncio.wait_for(node.drain(), 20)
            except Exception:
                log.warning("drain did not finish cleanly", exc_info=True)
            await super().shutdown(sockets)

    return Server


def DrainingServer(config: Any) -> Any:
    return _make_server_class()(config)


async def print_demo(app: Any, settings: Settings) -> None:
    """A demo room and two tokens to try it with."""
    from server.store.models import Room, now_ms

    node = app.state.node
    secret = settings.secret or ""
    host = auth.issue(secret, "demo_host", role="host", name="Demo Host", ttl_s=settings.token_ttl_s)
    viewer = auth.issue(secret, "demo_viewer", role="viewer", name="Demo Viewer", ttl_s=settings.token_ttl_s)
    room_id = "demo"
    state = await node.rooms.get(room_id)
    if state is None or not state.live:
        if await node.store.get_room(room_id) is None:
            await node.store.create_room(Room(room_id, "demo_host", "Demo LIVE", now_ms(), None))
        await node.rooms.create(room_id, "demo_host", "Demo Host", "Demo LIVE")
    base = f"http://{settings.host}:{settings.port}"
    print(
        "\n"
        "Giftstream is live.\n"
        f"  room:          {room_id}   ({base}/v1/rooms/{room_id}, socket ws://{settings.host}:{settings.port}/v1/rooms/{room_id}/ws?token=...)\n"
        f"  host token:    {host}\n"
        f"  viewer token:  {viewer}\n"
        "  try it:\n"
        f"    curl -s -X POST {base}/v1/recharges -H 'Authorization: Bearer {viewer}' "
        "-d '{\"package_id\":\"coins_65\",\"payment_method\":\"sandbox_card\",\"idempotency_key\":\"first\"}'\n"
        f"    python -m client_demo.cli watch --url {base} --room {room_id} --token {host}\n"
        f"    python -m client_demo.cli gift --url {base} --room {room_id} --token {viewer} --gift rose --count 5\n",
        flush=True,
    )


def cmd_token(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(auth.issue(settings.secret or "", args.user_id, role=args.role, name=args.name,
                     birthdate=args.birthdate, ttl_s=args.ttl or settings.token_ttl_s))
    return 0


def _run_with_store(settings: Settings, fn: Callable[[Any, Any], Awaitable[int]], start_redis: bool = True) -> int:
    settings, emb = _with_redis(settings, start_if_missing=start_redis)

    async def main() -> int:
        from redis.asyncio import Redis

        from server.store import open_store

        redis = Redis.from_url(settings.redis_url or "", decode_responses=True)
        store = open_store(settings.effective_database_url)
        try:
            if settings.migrate_on_start:
                await store.migrate()
            return await fn(redis, store)
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

    settings = _settings(args)

    async def audit(redis: Any, store: Any) -> int:
        report = await run_audit(redis, store, settings.partitions)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            t, w, d = report["totals"], report["wallets"], report["diamonds"]
            print(f"movements {t['movements']} (unsettled {t['unsettled']}), coins credited {t['coins_credited']}, "
                  f"spent {t['coins_spent']}; {w['wallets']} wallets hold {w['wallet_balances']}; "
                  f"{d['gifts']} gifts settled, host diamond units {d['host_diamond_units']}")
            for f in report["failures"]:
                print("FAIL:", f)
            print("audit ok" if report["ok"] else "audit FAILED")
        return 0 if report["ok"] else 1

    return _run_with_store(settings, audit)


def cmd_rebuild(args: argparse.Namespace) -> int:
    from server.settlement.rebuild import rebuild_wallets

    settings = _settings(args)

    async def rebuild(redis: Any, store: Any) -> int:
        report = await rebuild_wallets(redis, store, settings.partitions, dry_run=args.dry_run)
        print(json.dumps(report, indent=2, default=str))
        return 0

    return _run_with_store(settings, rebuild)


def cmd_migrate(args: argparse.Namespace) -> int:
    from server.store import open_store

    settings = _settings(args)

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

    settings = _settings(args)

    async def settle(redis: Any, store: Any) -> int:
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

    return _run_with_store(settings, settle, start_redis=False)


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

    migrate = sub.add_parser("migrate", help="apply schema migrations")
    _common(migrate)
    migrate.set_defaults(fn=cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except Exception:  # uvloop is optional for the CLI; serve uses it through uvicorn
        pass
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
