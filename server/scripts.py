"""Lua script registry: each script read once from the package, loaded at start-up, called by SHA."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from redis.asyncio import Redis

# script name -> package holding its .lua file
SCRIPTS = {
    "send_gift": "server.wallet",
    "gift_replay": "server.wallet",
    "credit": "server.wallet",
    "move": "server.wallet",
    "set_budget": "server.wallet",
    "room_publish": "server.rooms",
    "room_tick": "server.rooms",
    "room_goal": "server.rooms",
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

    def command(self, name: str, keys: list[str], args: list[Any]) -> list[Any]:
        """The EVALSHA command for the batcher's pipeline, which reloads the scripts on NOSCRIPT."""
        return ["EVALSHA", self.sha[name], len(keys), *keys, *args]
