"""The settler's side of the outbox consumer group, on the lean Redis pipeline.

Reading is most of a settler's own CPU: with redis-py, turning XREADGROUP replies into
(stream, id, dict) triples cost about as much as building the SQL rows. Here the commands
are packed by hiredis, the replies are parsed (and decoded) by hiredis in C, and each
entry's flat field list goes straight to the codec (server/movement.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis.exceptions import ResponseError

from server.fastpipe import Arg, Pipe
from server.keys import SETTLER_GROUP
from server.movement import Movement, from_flat


@dataclass(slots=True)
class Batch:
    """Movements read in one go, and the entry ids to acknowledge once they are committed."""

    movements: list[Movement] = field(default_factory=list)
    ids: dict[str, list[str]] = field(default_factory=dict)
    # Some stream gave as many entries as asked for: there is probably more behind.
    full: bool = False

    def add(self, stream: str, messages: list[Any]) -> None:
        ids = self.ids.setdefault(stream, [])
        append_id, append_movement = ids.append, self.movements.append
        for mid, flat in messages:
            if flat:  # an entry deleted while still pending comes back without fields: skip it
                append_movement(from_flat(flat))
                append_id(mid)


class GroupConsumer:
    def __init__(self, pipe: Pipe, streams: list[str], consumer: str) -> None:
        self.pipe = pipe
        self.streams = streams
        self.consumer = consumer

    async def read(self, start_id: str, count: int, block_ms: int | None) -> Batch:
        """Up to `count` entries of every stream, from `start_id` ('>' for new ones, '0' for our
        pending ones). Only when all streams are empty, wait up to `block_ms` for any of them."""
        # One XREADGROUP per stream, pipelined: each is short inside valkey, so debits are served
        # between them (one read over all streams held valkey for up to ~90 ms), and per-stream
        # reads are what a cluster needs anyway.
        replies = await self.pipe.execute(
            [("XREADGROUP", "GROUP", SETTLER_GROUP, self.consumer, "COUNT", count, "STREAMS", stream, start_id)
             for stream in self.streams])
        batch = Batch()
        for reply in replies:
            self._add(batch, reply, count)
        if not batch.ids and block_ms is not None and self.pipe.sharded:
            # On a cluster one XREADGROUP cannot span the partitions' slots (CROSSSLOT): poll
            # instead, a quarter of the block time apart (16 short reads each time).
            await asyncio.sleep(block_ms / 4000)
        elif not batch.ids and block_ms is not None:
            blocking: list[Arg] = ["XREADGROUP", "GROUP", SETTLER_GROUP, self.consumer, "COUNT", count,
                                   "BLOCK", block_ms, "STREAMS", *self.streams, *([start_id] * len(self.streams))]
            self._add(batch, (await self.pipe.execute([blocking]))[0], count)
        return batch

    @staticmethod
    def _add(batch: Batch, reply: Any, count: int) -> None:
        if reply is None:  # nothing new in these streams
            return
        if isinstance(reply, hiredis.ReplyError):
            raise ResponseError(str(reply))
        if isinstance(reply, Exception):  # a cluster node's connection lost (clusterpipe.py)
            raise reply
        for stream, messages in reply:
            batch.full = batch.full or len(messages) >= count
            batch.add(stream, messages)

    async def ack(self, ids: dict[str, list[str]]) -> None:
        """XACK then XDEL: the entries leave the group's pending list, then the stream."""
        commands: list[list[Arg]] = []
        for stream, entry_ids in ids.items():
            if entry_ids:
                commands.append(["XACK", stream, SETTLER_GROUP, *entry_ids])
                commands.append(["XDEL", stream, *entry_ids])
        if not commands:
            return
        for reply in await self.pipe.execute(commands):
            if isinstance(reply, hiredis.ReplyError):
                raise ResponseError(str(reply))
            if isinstance(reply, Exception):
                raise reply
