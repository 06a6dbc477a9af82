"""Every Redis key name and hash tag, built here and nowhere else.

Cluster rule: a Lua script touches keys of one slot only, so every key a script
touches carries the same hash tag:
- user partition ``{p<k>}``: wallets, idempotency keys, credited orders, totals, outbox;
- room ``{r:<room_id>}``: room state, event stream, leaderboard, combos, presence, channel.
"""

from __future__ import annotations

import zlib

PREFIX = "gs"


def partition_of(user_id: str, partitions: int) -> int:
    return zlib.crc32(user_id.encode()) % partitions


class UserKeys:
    __slots__ = ("partition", "tag", "wallet", "totals", "outbox", "orders", "user_id")

    def __init__(self, user_id: str, partitions: int) -> None:
        self.user_id = user_id
        self.partition = partition_of(user_id, partitions)
        self.tag = partition_tag(self.partition)
        self.wallet = f"{PREFIX}:{self.tag}:u:{user_id}"
        self.totals = totals_key(self.partition)
        self.outbox = outbox_key(self.partition)
        self.orders = f"{PREFIX}:{self.tag}:orders"

    def idempotency(self, client_id: str) -> str:
        return f"{PREFIX}:{self.tag}:idem:{self.user_id}:{client_id}"

    def done(self, kind_code: str) -> str:
        """Keyed movements of one kind made in the partition: "<user>\n<ref>" -> "<seq>\n<fingerprint>"
        (move.lua), so each is made once per (kind, user, ref)."""
        return f"{PREFIX}:{self.tag}:done:{kind_code}"


def partition_tag(partition: int) -> str:
    return "{p" + str(partition) + "}"


def totals_key(partition: int) -> str:
    return f"{PREFIX}:{partition_tag(partition)}:totals"


def outbox_key(partition: int) -> str:
    return f"{PREFIX}:{partition_tag(partition)}:outbox"


def quarantine_key(partition: int) -> str:
    """Outbox entries the settler set aside after a permanent SQL error (settler.py)."""
    return f"{PREFIX}:{partition_tag(partition)}:quarantine"


def wallet_pattern(partition: int) -> str:
    return f"{PREFIX}:{partition_tag(partition)}:u:*"


def user_from_wallet_key(key: str) -> str:
    return key.split(":u:", 1)[1]


class RoomKeys:
    __slots__ = ("room_id", "tag", "state", "events", "leaderboard", "combos", "presence", "channel", "names")

    def __init__(self, room_id: str) -> None:
        self.room_id = room_id
        self.tag = "{r:" + room_id + "}"
        self.state = f"{PREFIX}:{self.tag}:state"
        self.events = f"{PREFIX}:{self.tag}:events"
        self.leaderboard = f"{PREFIX}:{self.tag}:top"
        self.combos = f"{PREFIX}:{self.tag}:combo"
        self.presence = f"{PREFIX}:{self.tag}:presence"
        self.channel = f"{PREFIX}:{self.tag}:ch"
        self.names = f"{PREFIX}:{self.tag}:names"

    def published(self, debit_ms: int) -> str:
        """Gift ids published to the room, one hash per minute of their debit (room_publish.lua)."""
        return f"{PREFIX}:{self.tag}:pub:{debit_ms // 60_000}"


def room_id_from_channel(channel: str) -> str:
    return channel[len(PREFIX) + 4 : channel.index("}")]


SETTLER_GROUP = "settlers"

# Balance changes a user did not make with their own gift (a late credit, a refund, a reward), for
# their room sockets on every node: one channel every node subscribes to (low volume).
WALLET_CHANNEL = f"{PREFIX}:wallet-events"
