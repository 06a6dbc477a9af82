"""Two-factor enrolment and diamond cash-out: /v1/me/2fa, /v1/me/withdrawals, the payout webhook."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []
