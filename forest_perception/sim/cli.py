"""``forest-sim``: inspect a generated forest or export it to Gazebo.

    forest-sim summary --seed 3 --size 60 --tree-density 800 [--json]
    forest-sim export-gazebo --out /tmp/forest --rovers 2 --seed 3 --image-size 320x240

World flags map onto ``WorldConfig`` fields (``--size`` -> ``size_m``, the forest's side in metres,
``--tree-density`` -> ``tree_density_per_ha``, ...). A value ``WorldConfig.validate()`` refuses ends the
command with its message, the field named by its flag, and exit status 2 (``cli_args.run_command``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import fields

from forest_perception.cli_args import (
    InputError,
    command_parser,
    image_size,
    output_dir,
    positive_float,
    positive_int,
    run_command,
)
from forest_perception.frames import CameraIntrinsics
from forest_perception.sim.gazebo import bridge_entries, export_gazebo
from forest_perception.sim.weather import WEATHER_PRESETS
from forest_perception.sim.world import WorldConfig, generate_world

PROG = "forest-sim"
_UNIT_SUFFIXES = ("_per_ha", "_deg", "_m")


def world_flag(field_name: str) -> str:
    """Command-line flag of a ``WorldConfig`` field: unit suffix dropped, ``_`` -> ``-``."""
    for suffix in _UNIT_SUFFIXES:
        if field_name.endswith(suffix):
            field_name = field_name[: -len(suffix)]
            break
    return "--" + field_name.replace("_", "-")


WORLD_FLAGS: dict[str, str] = {f.name: world_flag(f.name) for f in fields(WorldConfig)}
# export_gazebo arguments named in its error messages -> the flags that set them
_EXPORT_FLAGS = {
    "camera_rate_hz": "--camera-rate",
    "imu_rate_hz": "--imu-rate",
    "gps_rate_hz": "--gps-rate",
    "encoder_rate_hz": "--encoder-rate",
    "camera resolution": "--image-size",
    "hfov_deg": "--camera-hfov",
}


def _add_world_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("world (WorldConfig fields)")
    defaults = WorldConfig()
    for f in fields(WorldConfig):
        default = getattr(defaults, f.name)
        group.add_argument(
            WORLD_FLAGS[f.name],
            dest=f.name,
            type=int if isinstance(default, int) else float,
            default=default,
            metavar="N" if isinstance(default, int) else "X",
            help=f"WorldConfig.{f.name} (default {default})",
        )


def _world_config(args: argparse.Namespace) -> WorldConfig:
    return WorldConfig(**{f.name: getattr(args, f.name) for f in fields(WorldConfig)})


def build_parser() -> argparse.ArgumentParser:
    """The ``forest-sim`` argument parser with its subcommands."""
    parser, sub = command_parser(PROG, "Generate procedural forests and export them.",
                                 metavar="{summary,export-gazebo}")

    summary = sub.add_parser("summary", help="generate a world and print its stand statistics")
    _add_world_arguments(summary)
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    summary.set_defaults(handler=_summary, parser=summary)

    export = sub.add_parser("export-gazebo", help="write a Gazebo world and its ros_gz_bridge config")
    export.add_argument("--out", type=output_dir, required=True, help="output folder (created if missing)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace the world an earlier export wrote into --out")
    export.add_argument("--rovers", type=positive_int, default=1, help="rovers rover_0..rover_{N-1} (default 1)")
    export.add_argument("--weather", choices=sorted(WEATHER_PRESETS), help="lighting (default overcast)")
    cam = CameraIntrinsics()
    camera_hw = (cam.height, cam.width)
    export.add_argument("--image-size", type=image_size, default=camera_hw, metavar="WIDTHxHEIGHT",
                        help="camera images, pixels")
    for flag, kind, default, unit in (
        ("--camera-hfov", positive_float, cam.hfov_deg, "degrees"),
        ("--camera-rate", positive_float, 15.0, "Hz"),
        ("--imu-rate", positive_float, 200.0, "Hz"),
        ("--gps-rate", positive_float, 10.0, "Hz"),
        ("--encoder-rate", positive_float, 50.0, "Hz, odometry and joint states"),
    ):
        export.add_argument(flag, type=kind, default=default, help=f"{unit} (default {default})")
    export.add_argument("--json", action="store_true", help="print what was written as JSON")
    _add_world_arguments(export)
    export.set_defaults(handler=_export, parser=export)
    return parser


def with_flags(message: str) -> str:
    """A core's message with the ``WorldConfig`` / ``export_gazebo`` parameters it names put as their flags."""
    for name, flag in sorted({**WORLD_FLAGS, **_EXPORT_FLAGS}.items(), key=lambda item: -len(item[0])):
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w])", flag, message)
    return message


def _print_table(rows: dict[str, object]) -> None:
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {text}")


def _world(args: argparse.Namespace):  # noqa: ANN202 - ForestWorld
    try:
        return generate_world(_world_config(args))
    except ValueError as exc:
        raise InputError(with_flags(str(exc))) from None


def _summary(args: argparse.Namespace) -> int:
    world = _world(args)
    summary = world.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_table(summary)
    return 0


def _export(args: argparse.Namespace) -> int:
    world = _world(args)
    try:
        result = export_gazebo(
            world,
            args.out,
            rover_names=tuple(f"rover_{i}" for i in range(args.rovers)),
            intrinsics=CameraIntrinsics(args.image_size[1], args.image_size[0], args.camera_hfov),
            camera_rate_hz=args.camera_rate,
            imu_rate_hz=args.imu_rate,
            gps_rate_hz=args.gps_rate,
            encoder_rate_hz=args.encoder_rate,
            weather=args.weather,
            overwrite=args.overwrite,
        )
    except ValueError as exc:
        raise InputError(with_flags(str(exc))) from None
    world_sdf = result.world_sdf.resolve()
    bridge = result.bridge_yaml.resolve()
    commands = {
        "gazebo": f"gz sim -r {world_sdf}",
        "bridge": "ros2 run ros_gz_bridge parameter_bridge --ros-args "
        f"-p config_file:={bridge} -p use_sim_time:=true",
        "launch": "ros2 launch forest_perception gazebo_sim.launch.py "
        f"world_sdf:={world_sdf} bridge_config:={bridge}",
    }
    if args.json:
        print(json.dumps({
            "files": [str(p.resolve()) for p in result.files],
            "world_name": result.world_name,
            "rovers": {n: list(p) for n, p in zip(result.rover_names, result.rover_poses)},
            "commands": commands,
        }, indent=2))
        return 0
    summary = world.summary()
    print(f"Gazebo world '{result.world_name}': {summary['trees']} trees, {summary['logs']} logs, "
          f"{summary['bushes']} bushes, {summary['rocks']} rocks, rovers {', '.join(result.rover_names)}")
    for path in result.files:
        print(f"  wrote {path.resolve()}")
    print(f"  bridge maps {len(bridge_entries(result.rover_names))} topics onto /<rover>/... and /clock")
    print("Run (Gazebo Harmonic + ros_gz):")
    print(f"  {commands['gazebo']}")
    print(f"  {commands['bridge']}")
    print("or both at once:")
    print(f"  {commands['launch']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``forest-sim``; returns the exit status: 2 with ``forest-sim <command>: error: ...``."""
    return run_command(PROG, build_parser(), lambda args: args.handler(args), argv)


if __name__ == "__main__":
    sys.exit(main())
