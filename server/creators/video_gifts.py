"""A gift on a video, top to bottom: find the video -> validate -> admit -> debit.

`POST /v1/videos/{video_id}/gifts {id, gift, count}` charges exactly as a room gift does
(server/gifts.py), with the same codes in the same order (docs/protocol.md, "Gifts on videos"):

1. the video exists (`not_found`): its owner is whom the gift credits;
2. validate: the catalog and the count (gift_rules.order, as the socket does);
3. admit: the node is not draining, the sender's per-user rate, then the sender's age and a gift
   to one's own video (gift_rules.check_sender). A gift refused here may be a retry of one
   charged before: its first result is looked up (read-only) and answered instead;
4. debit: send_gift.lua in the sender's partition, group-committed with the socket's gifts.
   The movement's room_id is the video id and its host_id the owner, so settlement credits the
   owner's diamonds and the gift lands in the ledger as any other: nothing downstream changes.

A video gift is published to no room: it appears in the video's gift list once settled.
The idempotency key `id` is the sender's, shared with their room gifts: the same id on a room
and on a video is an idempotency_conflict, as on two rooms.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from server import errors, gift_rules
from server.auth import Principal
from server.catalog import Catalog
from server.codes import Err, GiftstreamError
from server.protocol import Gift
from server.ratelimit import Buckets
from server.settings import Settings
from server.store.base import Store
from server.store.videos import Video
from server.wallet.service import Debit, Wallet

log = logging.getLogger("giftstream.video_gifts")

VIDEO_ID_PREFIX = "v-"
# Longer than any id this server makes ("v-" + 12): refused before any store read.
MAX_VIDEO_ID_LEN = 64
# Video owners kept in memory (a video's owner never changes): the gift path reads no SQL for a
# video gifted lately. 10,000 entries are about 2 MB.
OWNER_CACHE = 10_000


def could_be_video_id(text: str) -> bool:
    """Whether `text` may be an id this server made (creators/videos.py new_video_id): anything
    else is not_found without a store read (PostgreSQL text cannot even hold a NUL)."""
    return (text.startswith(VIDEO_ID_PREFIX) and len(text) <= MAX_VIDEO_ID_LEN and text.isascii()
            and text.isprintable())


@dataclass(frozen=True, slots=True)
class Sent:
    """A video gift's answer: the debit (or the first one's, replayed) and the video it was on."""

    video: Video
    debit: Debit


class VideoGifts:
    def __init__(self, settings: Settings, catalog: Catalog, wallet: Wallet, store: Store) -> None:
        self.settings = settings
        self.catalog = catalog
        self.wallet = wallet
        self.store = store
        # A person's gifting rate is the same whatever they gift: the socket's per-connection
        # figures, per user on this node.
        self.buckets = Buckets(settings.gift_rate_per_s, settings.gift_burst)
        self.videos: dict[str, Video] = {}
        self.draining = False

    async def video(self, video_id: str) -> Video:
        """The video, or not_found (an id this server could not have made costs no SQL read)."""
        cached = self.videos.get(video_id)
        if cached is not None:
            return cached
        if not could_be_video_id(video_id):
            raise GiftstreamError(Err.NOT_FOUND, "no such video")
        video = await self.store.get_video(video_id)
        if video is None:
            raise GiftstreamError(Err.NOT_FOUND, "no such video")
        if len(self.videos) >= OWNER_CACHE:
            del self.videos[next(iter(self.videos))]  # the oldest entry
        self.videos[video_id] = video
        return video

    async def send(self, sender: Principal, video_id: str, msg: Gift) -> Sent:
        video = await self.video(video_id)
        order = gift_rules.order(self.catalog, self.settings.max_gift_count, sender, msg.id, msg.gift, msg.count,
                                 video.owner_id, video.id)
        try:
            self.admit(sender, video)
        except GiftstreamError as refusal:
            # A retry of a gift charged already still learns its result (as on the socket).
            try:
                replayed = await self.wallet.replay(order)
            except GiftstreamError:
                raise  # the same id with other parameters
            except Exception:
                replayed = None  # Redis away: the refusal is the answer
            if replayed is None:
                raise refusal from None
            return Sent(video, replayed)
        try:
            debit = await self.wallet.send_gift(order)
        except GiftstreamError:
            raise  # refused by the script: insufficient_funds, budget_exceeded, ...
        except Exception as exc:
            # Redis away, or anything else: the outcome is unknown; a retry with the same id is safe.
            if not errors.is_unreachable(exc):
                log.error("video gift %s failed", msg.id, exc_info=exc)
            raise GiftstreamError(Err.UNAVAILABLE, errors.GIFT_UNKNOWN_MESSAGE) from None
        return Sent(video, debit)

    def admit(self, sender: Principal, video: Video) -> None:
        """The gateway's checks, cheapest first, as the socket's admission."""
        if self.draining:
            raise GiftstreamError(Err.UNAVAILABLE, "server restarting; retry with the same id")
        if not self.buckets.take(sender.user_id):
            raise GiftstreamError(Err.RATE_LIMITED, "too many gifts; retry later with the same id")
        gift_rules.check_sender(sender, video.owner_id, gift_rules.OWN_VIDEO)
