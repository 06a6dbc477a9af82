"""server/settings.py alone: env vars convert by each field's type."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from server.settings import Settings, from_env, to_env


def test_every_field_survives_the_trip_through_the_environment() -> None:
    """What a `--workers` parent writes (to_env) a worker reads back as the same values, every
    field with its own type: an int stays an int, a float a float, a bool a bool."""
    changed = {}
    for f in dataclasses.fields(Settings):
        d = f.default
        if isinstance(d, bool):
            changed[f.name] = not d
        elif isinstance(d, int | float):
            changed[f.name] = d + 3
        elif isinstance(d, Path):
            changed[f.name] = Path("/tmp/elsewhere")
        elif f.name != "node_id":
            changed[f.name] = "text-" + f.name
    original = Settings(**changed)
    back = from_env(to_env(original))
    for name, value in changed.items():
        got = getattr(back, name)
        assert got == value and type(got) is type(value), (name, value, got)
