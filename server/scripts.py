"""Lua script registry: each script read once from the package, loaded at start-up, called by SHA."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

# script name -> package holding its .lua file
SCRIPTS = {
    "send_gift": "server.wallet",
    "gift_replay": "server.wallet",
    "credit": "server.wallet",
    "room_publish": "server.rooms",
    "room_tick": "server.rooms",
}


class Scripts:
    def __init__(self) -> None:
        self.source: dict[str, str] = {}
        self.sha: dict[str, str] = {}
        for name, package in SCRIPTS.items():
            text = resources.files(package).joinpath(f"{name}.lua").read_text()
            self.source[name] = text
            self.sha[name] = hashlib.sha1(text.encode()).hexdigest()

    async def load(self, redis: Redis) -> None:
        for name, text in self.source.items():
            sha = await redis.script_load(text)
            assert sha == self.sha[name], f"{name}.lua hashed differently by the server"

    async def call(self, redis: Redis, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await redis.evalsha(self.sha[name], len(keys), *keys, *args)
        except NoScriptError:
            # The server lost its script cache (restart, failover, SCRIPT FLUSH): load and retry.
            await self.load(redis)
            return await redis.evalsha(self.sha[name], len(keys), *keys, *args)

    def command(self, name: str, keys: list[str], args: list[Any]) -> list[Any]:
        return ["EVALSHA", self.sha[name], len(keys), *keys, *args]
