"""The checks every gift passes, whichever way it comes: a room socket (gifts.py) or a video's
HTTP route (creators/video_gifts.py). Pure, no I/O: both paths refuse the same gifts with the
same codes and messages, and build the same order for send_gift.lua.

Two steps, not one, because the socket runs its own admission between them (docs/protocol.md,
"The order of a gift's checks"): `order` before any admission (the catalog, the count), and
`check_sender` last in admission, after the socket's cheap limits (the sender's age, a gift to
oneself), so that a refusal there is still looked up as a possible retry of a charged gift.
"""

from __future__ import annotations

from server.auth import Principal
from server.catalog import Catalog
from server.codes import Err, GiftstreamError
from server.wallet.service import GiftOrder

# What a creator reads who gifts their own room or their own video.
OWN_ROOM = "hosts cannot gift their own room"
OWN_VIDEO = "creators cannot gift their own video"


def order(catalog: Catalog, max_count: int, sender: Principal, client_id: str, gift: str, count: int,
          host_id: str, target_id: str) -> GiftOrder:
    """The gift exists and its count is within bounds: the debit `sender` asks for, credited to
    `host_id` and recorded against `target_id` (a room id, or a video id)."""
    item = catalog.gift(gift)
    if not 1 <= count <= max_count:
        raise GiftstreamError(Err.BAD_COUNT, f"count must be 1 to {max_count}")
    return GiftOrder(client_id, sender.user_id, sender.name, host_id, target_id, item.id, count, item.coins)


def check_sender(sender: Principal, host_id: str, own: str) -> None:
    """The sender is 18 or older, and not the creator the gift would credit (`own` says which
    of theirs it is)."""
    if not sender.is_adult():
        raise GiftstreamError(Err.AGE_RESTRICTED, "you must be 18 or older to send gifts")
    if sender.user_id == host_id:
        raise GiftstreamError(Err.NOT_ALLOWED, own)
