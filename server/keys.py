"""Every Redis key name and hash tag, built here and nowhere else.

Cluster rule: a Lua script touches keys of one slot only, so every key a script
touches carries the same hash tag:
- user partition ``{p<k>}``: wallets, gift id records, credited orders, totals, outbox;
- room ``{r:<room_id>}``: room state, event stream, leaderboard, combos, presence, channel.
"""

from __future__ import annotations

import hashlib
import zlib

PREFIX = "gs"


def partition_of(user_id: str, partitions: int) -> int:
    return zlib.crc32(user_id.encode()) % partitions


class UserKeys:
    __slots__ = ("partition", "tag", "wallet", "totals", "outbox", "orders", "gift_ids", "user_id")

    def __init__(self, user_id: str, partitions: int) -> None:
        self.user_id = user_id
        self.partition = partition_of(user_id, partitions)
        self.tag = partition_tag(self.partition)
        self.wallet = f"{PREFIX}:{self.tag}:u:{user_id}"
        self.totals = totals_key(self.partition)
        self.outbox = outbox_key(self.partition)
        self.orders = f"{PREFIX}:{self.tag}:orders"
        # The partition's charged gift ids (send_gift.lua): one hash, a field per gift id that
        # expires on its own (HSETEX). A key per gift id with its own TTL cost ~156 bytes a gift
        # (184 with 36-character user ids); a field of this hash ~98, whatever the ids' lengths
        # (docs/benchmarks.md, "What a gift leaves in valkey").
        self.gift_ids = gift_ids_key(self.partition)

    def gift_id_field(self, client_id: str) -> bytes:
        """The field of a gift id in `gift_ids`: 16 bytes of BLAKE2b over the user and the id, not
        the ids themselves, so every record is as small as the shortest (a gift id may be 128
        characters). 128 bits: two ids meeting is not to be expected in the life of the data set.
        The encoding is one-to-one: a gift id holds no line break."""
        return hashlib.blake2b(f"{self.user_id}\n{client_id}".encode(), digest_size=16).digest()

    def legacy_idempotency(self, client_id: str) -> str:
        """A gift id's record as releases before 2026-11-30 kept it: a string key of its own,
        read by send_gift.lua only while such records may still live (Wallet.start)."""
        return f"{PREFIX}:{self.tag}:idem:{self.user_id}:{client_id}"

    def done(self, kind_code: str) -> str:
        """Keyed movements of one kind made in the partition: "<user>\n<ref>" -> "<seq>\n<fingerprint>"
        (move.lua), so each is made once per (kind, user, ref)."""
        return f"{PREFIX}:{self.tag}:done:{kind_code}"


def partition_tag(partition: int) -> str:
    return "{p" + str(partition) + "}"


def gift_ids_key(partition: int) -> str:
    return f"{PREFIX}:{partition_tag(partition)}:gift-ids"


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


# Until when (ms) gift ids may still have records of the string-key layout (Wallet.start): set
# once, by the first node of a release with the hash layout to start on the data set. No hash
# tag: only Python reads it.
LEGACY_IDEMPOTENCY_UNTIL = f"{PREFIX}:legacy-idempotency-until"
LEGACY_IDEMPOTENCY_PATTERN = f"{PREFIX}:{{p*}}:idem:*"

SETTLER_GROUP = "settlers"

# Balance changes a user did not make with their own gift (a late credit, a refund, a reward), for
# their room sockets on every node: one channel every node subscribes to (low volume).
WALLET_CHANNEL = f"{PREFIX}:wallet-events"
