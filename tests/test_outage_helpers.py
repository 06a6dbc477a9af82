"""server/outage.py alone: backoff delays and an outage logged once with its end."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.outage import Backoff, Outage


def test_backoff_doubles_to_its_cap_within_its_jitter_and_starts_over_on_reset() -> None:
    b = Backoff(first=0.1, cap=1.0, jitter=0.5)
    bases = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for base in bases:
        assert base * 0.75 <= b.next() <= base * 1.25
    b.reset()
    assert 0.075 <= b.next() <= 0.125
    exact = Backoff(first=0.2, cap=5.0, jitter=0.0)
    assert [exact.next() for _ in range(7)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


async def test_backoff_wait_returns_early_when_stopped() -> None:
    b = Backoff(first=30.0, cap=30.0, jitter=0.0)
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(b.wait(stop), 1.0)  # would take 30 s if it ignored the stop


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage(logging.getLogger("giftstream.test"), "widget pipes", "widgets wait")
    with caplog.at_level(logging.INFO, logger="giftstream.test"):
        assert outage.recovered() is None  # no outage: nothing to log
        assert outage.failed(ConnectionError()) is True
        assert outage.failed(ConnectionError()) is False
        assert outage.failed(TimeoutError()) is False
        assert outage.active
        lasted = outage.recovered()
        assert lasted is not None and lasted >= 0
        assert outage.recovered() is None
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "widget pipes failing (ConnectionError); widgets wait"
    assert messages[1].startswith("widget pipes working again after ")
    assert len(messages) == 2
