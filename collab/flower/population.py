"""The virtual rovers of a simulated swarm: who they are, where their data live, when they are out.

Read by the rover ClientApp and the coordinator ServerApp (run config ``population``) and written by
the simulation harness; the schedule (block-cyclic or per-rover availability) is in ``docs/federated.md``
("Simulation").
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

POPULATION_VERSION = 1
BLOCK_WEATHERS: tuple[str, ...] = ("sunny", "dusk", "overcast", "fog", "rain")
"""The light of each block of a block-cyclic day (block ``m`` drives in ``BLOCK_WEATHERS[m % 5]``)."""


@dataclass(frozen=True)
class VirtualRover:
    """One simulated rover."""

    rover_id: str
    partition_id: int
    forest_seed: int
    weather: str
    block: int = 0
    availability: float = 1.0  # probability of being out in one of its block's rounds
    scope: str = "all"
    fault: str = ""
    data_dir: str = ""
    frames: int = 8
    recorded: bool = False  # data_dir holds real recordings (--rover-data): never generated, never written


@dataclass
class Population:
    """The virtual rovers of a simulation and their availability schedule."""

    rovers: list[VirtualRover]
    seed: int = 0
    num_blocks: int = 1
    rounds_per_block: int = 1
    _by_id: dict[str, VirtualRover] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {r.rover_id: r for r in self.rovers}
        if len(self._by_id) != len(self.rovers):
            raise ValueError("population has repeated rover ids")
        if sorted(r.partition_id for r in self.rovers) != list(range(len(self.rovers))):
            raise ValueError("population partition ids must be 0..N-1, one per rover")
        if self.num_blocks < 1 or self.rounds_per_block < 1:
            raise ValueError(f"num_blocks and rounds_per_block must be >= 1, got {self.num_blocks}, "
                             f"{self.rounds_per_block}")

    def __len__(self) -> int:
        return len(self.rovers)

    def by_partition(self, partition_id: int) -> VirtualRover:
        """The rover simulated by Flower node ``partition-id``."""
        for rover in self.rovers:
            if rover.partition_id == partition_id:
                return rover
        raise ValueError(f"population has no rover for partition-id {partition_id} (it has {len(self.rovers)})")

    def rover(self, rover_id: str) -> VirtualRover:
        """The rover called ``rover_id``."""
        try:
            return self._by_id[rover_id]
        except KeyError:
            raise ValueError(f"population has no rover {rover_id!r}") from None

    def block_of(self, server_round: int) -> int:
        """The block of a round (rounds count from 1)."""
        return ((server_round - 1) // self.rounds_per_block) % self.num_blocks

    def is_available(self, rover_id: str, server_round: int) -> bool:
        """Whether the rover is out (connected) in ``server_round``; unknown rovers are not."""
        rover = self._by_id.get(rover_id)
        if rover is None:
            return False
        if self.num_blocks > 1 and self.block_of(server_round) != rover.block:
            return False
        draw = np.random.default_rng([self.seed, rover.partition_id, server_round]).random()
        return bool(draw < rover.availability)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "version": POPULATION_VERSION,
            "seed": self.seed,
            "num_blocks": self.num_blocks,
            "rounds_per_block": self.rounds_per_block,
            "rovers": [asdict(r) for r in self.rovers],
        }

    def save(self, path: str | Path) -> Path:
        """Write the population JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path


def make_population(
    num_rovers: int,
    data_root: str | Path,
    seed: int = 0,
    weathers: Sequence[str] = ("sunny", "overcast", "dusk", "fog", "rain"),
    num_blocks: int = 1,
    rounds_per_block: int = 1,
    availability: tuple[float, float] = (0.6, 1.0),
    decoder_fraction: float = 0.0,
    faults: Mapping[int, str] | None = None,
    frames: int = 8,
) -> Population:
    """A population of ``num_rovers`` virtual rovers (ids ``rover_000``...), reproducible from ``seed``.

    ``availability`` is the range each rover's probability of being out is drawn from;
    ``decoder_fraction`` of the rovers train only the decoder; ``faults`` maps partition ids to
    a fault of :data:`forest_perception.collab.flower.client_app.FAULTS` (such rovers are always available).
    """
    from forest_perception.sim.weather import get_weather

    if num_rovers < 1:
        raise ValueError(f"num_rovers must be >= 1, got {num_rovers}")
    if frames < 2:
        raise ValueError(f"frames must be >= 2 (two segments per rover), got {frames}")
    lo, hi = availability
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"availability must be a range within (0, 1], got {availability}")
    if not 0.0 <= decoder_fraction <= 1.0:
        raise ValueError(f"decoder_fraction must be within [0, 1], got {decoder_fraction}")
    for w in weathers:
        get_weather(w)
    faults = dict(faults or {})
    bad = {k: v for k, v in faults.items() if not 0 <= k < num_rovers}
    if bad:
        raise ValueError(f"faults name rovers outside 0..{num_rovers - 1}: {bad}")
    rng = np.random.default_rng([seed, 7])
    decoder_ids = set(rng.choice(num_rovers, size=round(decoder_fraction * num_rovers), replace=False).tolist())
    rovers = []
    for i in range(num_rovers):
        block = i % num_blocks
        weather = BLOCK_WEATHERS[block % len(BLOCK_WEATHERS)] if num_blocks > 1 else weathers[int(rng.integers(len(
            weathers)))]
        rover_id = f"rover_{i:03d}"
        rovers.append(
            VirtualRover(
                rover_id=rover_id,
                partition_id=i,
                forest_seed=int(rng.integers(2**31)),
                weather=weather,
                block=block,
                availability=1.0 if i in faults else float(round(rng.uniform(lo, hi), 4)),
                scope="decoder" if i in decoder_ids else "all",
                fault=faults.get(i, ""),
                data_dir=str(Path(data_root) / rover_id),
                frames=int(frames),
            )
        )
    return Population(rovers, seed=seed, num_blocks=num_blocks, rounds_per_block=rounds_per_block)


def rover_data_folders(text: str) -> list[str]:
    """Run config ``rover-data``: rover data folders separated by ``os.pathsep`` (``:``), as ``PATH`` is written."""
    return [part.strip() for part in str(text).split(os.pathsep) if part.strip()]


def recorded_rover_ids(folders: Sequence[str | Path]) -> list[str]:
    """One rover id per data folder: its name (characters outside ``[A-Za-z0-9_.-]`` become ``_``), made unique.

    ``--rover-data`` (a population) and run config ``rover-data`` name the rovers this one way.
    """
    ids: list[str] = []
    for i, folder in enumerate(folders):
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(folder).resolve().name).lstrip("_.-")[:56] or f"rover_{i:03d}"
        candidate, copy = name, 1
        while candidate in ids:
            copy += 1
            candidate = f"{name}-{copy}"
        ids.append(candidate)
    return ids


def recorded_population(
    folders: Sequence[str | Path],
    seed: int = 0,
    availability: tuple[float, float] = (1.0, 1.0),
    decoder_fraction: float = 0.0,
    faults: Mapping[int, str] | None = None,
) -> Population:
    """A population whose rover ``i`` is the recordings in ``folders[i]`` (forest dataset layout, read only).

    Rover ids come from :func:`recorded_rover_ids`; availability, decoder-only rovers and faults are drawn as
    :func:`make_population` draws them. A folder that is empty or unreadable makes its rover report no data.
    """
    if not folders:
        raise ValueError("recorded_population needs at least one rover data folder")
    lo, hi = availability
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"availability must be a range within (0, 1], got {availability}")
    faults = dict(faults or {})
    bad = {k: v for k, v in faults.items() if not 0 <= k < len(folders)}
    if bad:
        raise ValueError(f"faults name rovers outside 0..{len(folders) - 1}: {bad}")
    rng = np.random.default_rng([seed, 7])
    decoder_ids = set(rng.choice(len(folders), size=round(decoder_fraction * len(folders)), replace=False).tolist())
    rovers = [
        VirtualRover(
            rover_id=rover_id, partition_id=i, forest_seed=0, weather="", block=0,
            availability=1.0 if i in faults else float(round(rng.uniform(lo, hi), 4)),
            scope="decoder" if i in decoder_ids else "all", fault=faults.get(i, ""),
            data_dir=str(Path(folder).resolve()), frames=0, recorded=True,
        )
        for i, (rover_id, folder) in enumerate(zip(recorded_rover_ids(folders), folders))
    ]
    return Population(rovers, seed=seed)


@lru_cache(maxsize=8)
def _load_population_cached(path: str, mtime_ns: int) -> Population:
    raw = json.loads(Path(path).read_text())
    if raw.get("version") != POPULATION_VERSION:
        raise ValueError(f"population {path}: version {raw.get('version')!r}, this code reads {POPULATION_VERSION}")
    try:
        rovers = [VirtualRover(**r) for r in raw["rovers"]]
        return Population(rovers, int(raw["seed"]), int(raw["num_blocks"]), int(raw["rounds_per_block"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"population {path} is malformed: {exc}") from None


def load_population(path: str | Path) -> Population:
    """Read a population JSON (cached per process until the file changes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"population file {path} does not exist")
    return _load_population_cached(str(path.resolve()), path.stat().st_mtime_ns)
