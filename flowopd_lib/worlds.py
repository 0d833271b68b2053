"""The toy world's worlds: a base, the conflict setting its rewards read, and its own shipped teachers.

    toy   the base `toy` at conflict 0: the first study (flowopd_lib/assets/teachers)
    dial  the glyph base `toy_glyph` at the calibrated conflict 0.5 (flowopd_lib/assets/teachers_dial;
          docs/toy_world.md "The conflict dial")

Torch-free (the run-spec runner reads it before any stage starts): `teachers` trains and ships a
world's teachers (`--world`); a run spec names a world's teachers as `{teachers}` (toy) or
`{teachers_<world>}` (e.g. `{teachers_dial}`).
"""
from __future__ import annotations

import dataclasses

from .cli import UserError


@dataclasses.dataclass(frozen=True)
class World:
    """A set of teachers' world: the base they adapt, the conflict setting their rewards read
    (rewards/conflict.py), and the folder beside assets/teachers its teachers are shipped to (None:
    assets/teachers itself)."""
    base: str
    conflict: float
    folder: str | None = None

    @property
    def teachers_folder(self) -> str:
        """The folder's name under flowopd_lib/assets."""
        return self.folder or "teachers"


WORLDS = {
    "toy": World("toy", 0.0),
    # the glyph base and the dial's calibrated default (diagnostics.conflict_calibration)
    "dial": World("toy_glyph", 0.5, "teachers_dial"),
}


def world(name: str) -> World:
    if name not in WORLDS:
        raise UserError(f"unknown world {name!r}; worlds: {sorted(WORLDS)}")
    return WORLDS[name]


def placeholder(name: str) -> str:
    """How a run spec names the world's shipped-teachers folder: `teachers` (toy), `teachers_<world>`."""
    return "teachers" if name == "toy" else f"teachers_{name}"
