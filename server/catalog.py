"""Gifts and coin packages, loaded from the package's data file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from server.codes import Err, GiftstreamError


@dataclass(frozen=True, slots=True)
class GiftItem:
    id: str
    name: str
    coins: int


@dataclass(frozen=True, slots=True)
class Package:
    id: str
    coins: int
    price_cents: int
    currency: str


@dataclass(frozen=True)
class Catalog:
    gifts: dict[str, GiftItem]
    packages: dict[str, Package]
    currency: str
    custom_min: int
    custom_max: int
    rate_coins: int
    rate_price_cents: int

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

    def custom(self, coins: int) -> Package:
        """A custom amount, priced at the 65-coin rate, rounded up to the cent."""
        if not self.custom_min <= coins <= self.custom_max:
            raise GiftstreamError(
                Err.BAD_AMOUNT, f"custom amounts are {self.custom_min} to {self.custom_max} coins"
            )
        price = -(-coins * self.rate_price_cents // self.rate_coins)
        return Package(f"custom_{coins}", coins, price, self.currency)

    def to_json(self) -> dict[str, Any]:
        return {
            "gifts": [{"id": g.id, "name": g.name, "coins": g.coins} for g in self.gifts.values()],
            "packages": [
                {"id": p.id, "coins": p.coins, "price_cents": p.price_cents, "currency": p.currency}
                for p in self.packages.values()
            ],
            "custom": {"min_coins": self.custom_min, "max_coins": self.custom_max,
                       "currency": self.currency},
        }


@cache
def load() -> Catalog:
    raw = json.loads(resources.files("server.data").joinpath("catalog.json").read_text())
    currency = raw["currency"]
    return Catalog(
        gifts={g["id"]: GiftItem(g["id"], g["name"], int(g["coins"])) for g in raw["gifts"]},
        packages={
            p["id"]: Package(p["id"], int(p["coins"]), int(p["price_cents"]), currency)
            for p in raw["packages"]
        },
        currency=currency,
        custom_min=raw["custom"]["min_coins"],
        custom_max=raw["custom"]["max_coins"],
        rate_coins=raw["custom"]["rate_coins"],
        rate_price_cents=raw["custom"]["rate_price_cents"],
    )
