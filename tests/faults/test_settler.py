"""A standalone `giftstream settle` killed (-9) while it commits batches mid-storm, then started
again under its consumer name: it settles what it had read and not acknowledged, once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import assert_nothing_lost, run_faults

pytestmark = pytest.mark.timeout(160)


def test_settler_kill9_while_it_commits(tmp_path: Path) -> None:
    report = run_faults(tmp_path, "--separate-settler", "--faults", "settler_kill9", "--count", "2")
    assert_nothing_lost(report, 2)
