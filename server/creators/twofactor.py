"""A host's two-factor authentication (TOTP, RFC 6238): POST /v1/me/2fa, POST /v1/me/2fa/confirm,
GET /v1/me/2fa, and the code check cash-out makes.

A code is good once: the store keeps the last time step whose code was accepted, per user, and
takes only a later one (a conditional UPDATE, so two requests with one code cannot both pass).
Every check is counted before it is made (so a thousand guesses sent at once are a thousand
checks); past settings.totp_max_failures in FAILURE_WINDOW_MS every check answers rate_limited,
and a right code forgets the count. Six digits are a million codes: at five a quarter hour a
guesser needs about 3,000 hours for even odds.

The TOTP secret is a credential. It is made here (160 random bits), shown once, in the enrolment's
answer (for the authenticator app), and kept as text in the ledger database's twofactor table
(sql/0006_withdrawals.sql says who can read it there). It is never logged, never in a repr
(store.withdrawals.TwoFactor), and never shown again.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

import pyotp
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from server.codes import Err, GiftstreamError
from server.http_api import json_body, node_of, principal_of
from server.settings import Settings
from server.store.base import Store
from server.store.withdrawals import TwoFactor

ISSUER = "Giftstream"
STEP_S = 30
# The steps either side of the server's are good too: a phone's clock drifts.
VALID_WINDOW = 1
FAILURE_WINDOW_MS = 15 * 60 * 1000


def step_of(code: str, secret: str, now_s: float, after_step: int) -> int | None:
    """The latest time step within VALID_WINDOW of `now_s`, and later than `after_step`, whose
    code `code` is; None when there is none (a wrong code, or a used one)."""
    if len(code) != 6 or not (code.isascii() and code.isdigit()):
        return None
    totp = pyotp.TOTP(secret)
    current = int(now_s // STEP_S)
    for step in range(current + VALID_WINDOW, max(current - VALID_WINDOW, after_step + 1) - 1, -1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


def code_in(body: dict[str, Any], name: str) -> str | None:
    code = body.get(name)
    if code is not None and not isinstance(code, str):
        raise GiftstreamError(Err.BAD_REQUEST, f"{name} must be the 6-digit code as a string")
    return code


async def check(store: Store, settings: Settings, tf: TwoFactor, secret: str, code: str | None, now_s: float) -> int:
    """The time step of `code`, a code of `secret` no request used yet: 403 bad_2fa_code when it is
    wrong or used, 429 rate_limited past the failures (for a right code too). The step is not
    taken here: the caller takes it with what the code allows."""
    if code is None:
        raise GiftstreamError(Err.BAD_2FA_CODE, "a two-factor code is needed")
    if not await store.totp_attempt(tf.user_id, int(now_s * 1000), settings.totp_max_failures, FAILURE_WINDOW_MS):
        raise GiftstreamError(Err.RATE_LIMITED, "too many wrong two-factor codes; try again in 15 minutes")
    step = step_of(code, secret, now_s, tf.last_step)
    if step is None:
        raise GiftstreamError(Err.BAD_2FA_CODE, "the two-factor code is wrong or was used already")
    return step


async def status(request: Request) -> Response:
    """GET /v1/me/2fa: whether two-factor authentication is on."""
    p = principal_of(request)
    p.require("host", "admin")
    tf = await node_of(request).store.twofactor(p.user_id)
    return JSONResponse({"active": tf is not None and tf.active,
                         "pending": tf is not None and tf.pending_secret is not None})


async def enrol(request: Request) -> Response:
    """POST /v1/me/2fa {"code"?}: a new TOTP secret to confirm; once one is active, a code of it is needed."""
    p = principal_of(request)
    p.require("host", "admin")
    node = node_of(request)
    store = node.store
    body = await json_body(request)
    code = code_in(body, "code")
    now = time.time()
    secret = pyotp.random_base32()
    active = not await store.totp_enrol(p.user_id, secret, int(now * 1000))
    if active:
        # A token alone (a stolen one) must not swap the secret for the thief's: the active
        # secret's code takes a step in the same statement that keeps the new one as pending.
        tf = await store.twofactor(p.user_id)
        assert tf is not None and tf.secret is not None, "an active secret is never removed"
        step = await check(store, node.settings, tf, tf.secret, code, now)
        if not await store.totp_reenrol(p.user_id, secret, tf.secret, step, int(now * 1000)):
            raise GiftstreamError(Err.BAD_2FA_CODE, "the two-factor code is wrong or was used already")
        await store.totp_passed(p.user_id)
    uri = pyotp.TOTP(secret).provisioning_uri(name=p.user_id, issuer_name=ISSUER)
    return JSONResponse({"secret": secret, "otpauth_uri": uri, "active": active})


async def confirm(request: Request) -> Response:
    """POST /v1/me/2fa/confirm {"code"}: a code of the pending secret makes it the active one."""
    p = principal_of(request)
    p.require("host", "admin")
    node = node_of(request)
    code = code_in(await json_body(request), "code")
    tf = await node.store.twofactor(p.user_id)
    if tf is None or tf.pending_secret is None:
        raise GiftstreamError(Err.NOT_FOUND, "no two-factor enrolment to confirm: POST /v1/me/2fa first")
    now = time.time()
    step = await check(node.store, node.settings, tf, tf.pending_secret, code, now)
    if not await node.store.totp_activate(p.user_id, tf.pending_secret, step, int(now * 1000)):
        # A newer enrolment replaced this secret meanwhile, or another request took the step.
        raise GiftstreamError(Err.BAD_2FA_CODE, "the two-factor code is wrong or was used already")
    await node.store.totp_passed(p.user_id)
    return JSONResponse({"active": True})


ROUTES: list[BaseRoute] = [
    Route("/v1/me/2fa", status, methods=["GET"]),
    Route("/v1/me/2fa", enrol, methods=["POST"]),
    Route("/v1/me/2fa/confirm", confirm, methods=["POST"]),
]
