"""Lua script registry: each script read once from the package, loaded at start-up, called by SHA."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from server.fastpipe import Pipe

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


# On a cluster a plain PUBLISH goes to every node of the cluster; a room's events go to the
# shard that owns the room instead (SPUBLISH), to the nodes that SSUBSCRIBEd there
# (rooms/shardbus.py). Scripts publish only on their room's channel, which carries the room's
# hash tag, so SPUBLISH from inside the script is in the script's own slot.
_PUBLISH = "redis.call('PUBLISH', "
_SPUBLISH = "redis.call('SPUBLISH', "


class Scripts:
    def __init__(self, sharded_pubsub: bool = False) -> None:
        """`sharded_pubsub` (cluster mode): every script's PUBLISH is sent as SPUBLISH."""
        self.source: dict[str, str] = {}
        self.sha: dict[str, str] = {}
        for name, package in SCRIPTS.items():
            text = resources.files(package).joinpath(f"{name}.lua").read_text()
            if sharded_pubsub:
                text = text.replace(_PUBLISH, _SPUBLISH)
            self.source[name] = text
            self.sha[name] = hashlib.sha1(text.encode()).hexdigest()

    async def load(self, redis: Redis) -> None:
        for name, text in self.source.items():
            sha = await redis.script_load(text)
            assert sha == self.sha[name], f"{name}.lua hashed differently by the server"

    async def load_on(self, pipe: Pipe) -> None:
        """Every script on every primary the pipeline reaches, in one round trip each: after a
        NOSCRIPT (a restarted server, or a replica promoted by a failover: script caches are
        not replicated)."""
        names = list(self.source)
        for replies in await pipe.everywhere([["SCRIPT", "LOAD", self.source[n]] for n in names]):
            for name, sha in zip(names, replies, strict=True):
                if isinstance(sha, Exception):
                    raise ResponseError(f"{name}.lua not loaded: {sha}")
                text = sha.decode() if isinstance(sha, bytes) else str(sha)
                assert text == self.sha[name], f"{name}.lua hashed differently by the server"

    def command(self, name: str, keys: list[str], args: list[Any]) -> list[Any]:
        """The EVALSHA command for the batcher's pipeline, which reloads the scripts on NOSCRIPT."""
        return ["EVALSHA", self.sha[name], len(keys), *keys, *args]
