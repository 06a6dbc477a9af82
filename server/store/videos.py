"""Videos and the gifts sent on them (issue 12).

`VideosStore` is what the rest of the server calls; `SQLiteVideos` and `PostgresVideos` are the
two backends' halves, mixed into SQLiteStore and PostgresStore (which give them `_run`, and
`_get_pool`/`_fetch`/`_fetchrow`/`_execute`).

A video's gifts are rows of `gifts` whose room_id is the video's id (sql/0008_videos.sql): its
totals and its gift list read them through gifts_room_sent (room_id, sent_ms, id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from server.store.halves import PostgresHalf, SQLiteHalf
from server.store.queries import numbered as _pg  # cached: one conversion a statement


@dataclass(frozen=True, slots=True)
class Video:
    id: str
    owner_id: str
    # The owner's display name as the users table has it now (the last name they came with).
    owner_name: str
    title: str
    created_ms: int


@dataclass(frozen=True, slots=True)
class VideoGift:
    """A settled gift on a video, as GET /v1/videos/{id}/gifts lists it."""

    gift_id: str
    sender_id: str
    sender_name: str
    gift: str
    count: int
    coins: int
    sent_ms: int


INSERT_VIDEO = "INSERT INTO videos (id, owner_id, title, created_ms) VALUES (?, ?, ?, ?)"
VIDEO_BY_ID = ("SELECT v.id, v.owner_id, COALESCE(u.name, v.owner_id), v.title, v.created_ms FROM videos v"
               " LEFT JOIN users u ON u.id = v.owner_id WHERE v.id = ?")
# A range of gifts_room_sent: the cost grows with the video's gifts (see VideosStore.video_totals).
VIDEO_TOTALS = "SELECT COUNT(*), COALESCE(SUM(coins), 0) FROM gifts WHERE room_id = ?"
_GIFT_SELECT = "SELECT id, sender_id, sender_name, gift, count, coins, sent_ms FROM gifts WHERE room_id = ?"
# Newest first; from a cursor (sent_ms, id) exclusive. A row value, so both SQLite and PostgreSQL
# seek gifts_room_sent to the cursor instead of filtering the video's range from its newest end.
VIDEO_GIFTS = _GIFT_SELECT + " ORDER BY sent_ms DESC, id DESC LIMIT ?"
VIDEO_GIFTS_BEFORE = _GIFT_SELECT + " AND (sent_ms, id) < (?, ?) ORDER BY sent_ms DESC, id DESC LIMIT ?"


class VideosStore(Protocol):
    async def create_video(self, video: Video) -> None:
        """Store a new video (its owner's users row is upserted by the caller, as a room's is)."""
        ...

    async def get_video(self, video_id: str) -> Video | None: ...

    async def video_totals(self, video_id: str) -> tuple[int, int]:
        """(settled gifts, their coins) of a video. Reads each of its gifts: a video with a
        million gifts costs a million index entries and rows per call."""
        ...

    async def video_gifts(self, video_id: str, before: tuple[int, str] | None, limit: int) -> list[VideoGift]:
        """A video's settled gifts newest first, older than `before` (sent_ms, gift id) when given."""
        ...


def _video(row: Any) -> Video:
    return Video(str(row[0]), str(row[1]), str(row[2]), str(row[3]), int(row[4]))


def _gift(row: Any) -> VideoGift:
    return VideoGift(str(row[0]), str(row[1]), str(row[2]), str(row[3]), int(row[4]), int(row[5]), int(row[6]))


def _gifts_query(video_id: str, before: tuple[int, str] | None, limit: int) -> tuple[str, tuple[Any, ...]]:
    if before is None:
        return VIDEO_GIFTS, (video_id, limit)
    return VIDEO_GIFTS_BEFORE, (video_id, before[0], before[1], limit)


class SQLiteVideos(SQLiteHalf):
    async def create_video(self, video: Video) -> None:
        await self._run(lambda c: c.execute(INSERT_VIDEO, (video.id, video.owner_id, video.title, video.created_ms)))

    async def get_video(self, video_id: str) -> Video | None:
        row = await self._run(lambda c: c.execute(VIDEO_BY_ID, (video_id,)).fetchone())
        return _video(row) if row else None

    async def video_totals(self, video_id: str) -> tuple[int, int]:
        row = await self._run(lambda c: c.execute(VIDEO_TOTALS, (video_id,)).fetchone())
        return int(row[0]), int(row[1])

    async def video_gifts(self, video_id: str, before: tuple[int, str] | None, limit: int) -> list[VideoGift]:
        sql, args = _gifts_query(video_id, before, limit)
        return [_gift(r) for r in await self._run(lambda c: c.execute(sql, args).fetchall())]


class PostgresVideos(PostgresHalf):
    async def create_video(self, video: Video) -> None:
        await self._execute(_pg(INSERT_VIDEO), video.id, video.owner_id, video.title, video.created_ms)

    async def get_video(self, video_id: str) -> Video | None:
        row = await self._fetchrow(_pg(VIDEO_BY_ID), video_id)
        return _video(row) if row else None

    async def video_totals(self, video_id: str) -> tuple[int, int]:
        row = await self._fetchrow(_pg(VIDEO_TOTALS), video_id)
        assert row is not None
        return int(row[0]), int(row[1])

    async def video_gifts(self, video_id: str, before: tuple[int, str] | None, limit: int) -> list[VideoGift]:
        sql, args = _gifts_query(video_id, before, limit)
        return [_gift(r) for r in await self._fetch(_pg(sql), *args)]
