"""Gifts and coin packages, loaded from the package's data file.

A package has a price per sales channel. `web` is the list price; the app stores keep a fee
(30%), which in-app prices pass on: by default the web price grossed up for the fee (so the
platform nets the web price) and raised to end in .99, as store price points do. The data file
can set a package's in-app price itself (`prices`), for a store's own price tier. Custom amounts
are sold on the web only: the stores sell fixed products.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from server.codes import Err, GiftstreamError


@dataclass(frozen=True, slots=True)
class GiftItem:
    id: str
    name: str
    coins: int


WEB = "web"


@dataclass(frozen=True, slots=True)
class Package:
    id: str
    coins: int
    # The web (list) price.
    price_cents: int
    currency: str
    # channel -> price in cents; every channel the catalog sells on, `web` included.
    prices: dict[str, int] = field(default_factory=dict)

    def price(self, channel: str) -> int:
        price = self.prices.get(channel)
        if price is None:
            raise GiftstreamError(Err.BAD_REQUEST, f"{self.id} is not sold on the {channel} channel")
        return price


def in_app_price(web_cents: int, fee_bp: int) -> int:
    """The web price grossed up for a store fee of `fee_bp` basis points, ending in 99 cents."""
    gross = -(-web_cents * 10_000 // (10_000 - fee_bp))
    return max(99, -(-(gross - 99) // 100) * 100 + 99)


@dataclass(frozen=True)
class Catalog:
    gifts: dict[str, GiftItem]
    packages: dict[str, Package]
    currency: str
    custom_min: int
    custom_max: int
    rate_coins: int
    rate_price_cents: int
    channels: tuple[str, ...] = (WEB,)
    custom_channels: tuple[str, ...] = (WEB,)

    def gift(self, gift_id: str) -> GiftItem:
        item = self.gifts.get(gift_id)
        if item is None:
            raise GiftstreamError(Err.UNKNOWN_GIFT, f"no gift {gift_id[:64]!r} in the catalog")
        return item

    def package(self, package_id: str) -> Package:
        pkg = self.packages.get(package_id)
        if pkg is None:
            raise GiftstreamError(Err.UNKNOWN_PACKAGE, f"no package {package_id[:64]!r}")
        return pkg

    def custom(self, coins: int, channel: str = WEB) -> Package:
        """A custom amount, priced at the 65-coin rate, rounded up to the cent (web only)."""
        if channel not in self.custom_channels:
            raise GiftstreamError(Err.BAD_REQUEST, f"custom amounts are sold on the {', '.join(self.custom_channels)}"
                                                   f" channel only; choose a package_id on {channel}")
        if not self.custom_min <= coins <= self.custom_max:
            raise GiftstreamError(
                Err.BAD_AMOUNT, f"custom amounts are {self.custom_min} to {self.custom_max} coins"
            )
        price = -(-coins * self.rate_price_cents // self.rate_coins)
        return Package(f"custom_{coins}", coins, price, self.currency, dict.fromkeys(self.custom_channels, price))

    def to_json(self) -> dict[str, Any]:
        return {
            "gifts": [{"id": g.id, "name": g.name, "coins": g.coins} for g in self.gifts.values()],
            "packages": [
                {"id": p.id, "coins": p.coins, "price_cents": p.price_cents, "currency": p.currency,
                 "prices": dict(p.prices)}
                for p in self.packages.values()
            ],
            "custom": {"min_coins": self.custom_min, "max_coins": self.custom_max,
                       "currency": self.currency, "channels": list(self.custom_channels)},
        }


@cache
def load() -> Catalog:
    raw = json.loads(resources.files("server.data").joinpath("catalog.json").read_text())
    currency = raw["currency"]
    channels = tuple(raw.get("channels", [WEB]))
    fee_bp = int(raw.get("store_fee_bp", 0))

    def prices(p: dict[str, Any]) -> dict[str, int]:
        web = int(p["price_cents"])
        given = {c: int(v) for c, v in p.get("prices", {}).items()}
        return {c: given.get(c, web if c == WEB else in_app_price(web, fee_bp)) for c in channels}

    return Catalog(
        gifts={g["id"]: GiftItem(g["id"], g["name"], int(g["coins"])) for g in raw["gifts"]},
        packages={
            p["id"]: Package(p["id"], int(p["coins"]), int(p["price_cents"]), currency, prices(p))
            for p in raw["packages"]
        },
        currency=currency,
        custom_min=raw["custom"]["min_coins"],
        custom_max=raw["custom"]["max_coins"],
        rate_coins=raw["custom"]["rate_coins"],
        rate_price_cents=raw["custom"]["rate_price_cents"],
        channels=channels,
        custom_channels=tuple(raw["custom"].get("channels", [WEB])),
    )
