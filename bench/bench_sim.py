"""Simulator figures: rendered frames per second and real-time factor with 1, 3 and 5 rovers, per renderer.

Both renderers (offscreen OpenGL on EGL, PyBullet's TinyRenderer) are measured in one run. The
real-time factor is measured with inline rendering (render_workers 0) and with 1 and 2 background
render processes, side by side (worker start-up, a scene build each, is not timed).

Run: .venv/bin/python bench/bench_sim.py [--seconds 10] [--seed 0] [--rovers 1 3 5] [--renderers opengl tiny]
Prints a table; every figure of one run is measured on the same machine, side by side.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from forest_perception.frames import CameraIntrinsics
from forest_perception.sim.gl_renderer import egl_problem
from forest_perception.sim.scene import ForestScene
from forest_perception.sim.simulator import ForestSimulator, RoverConfig, SimConfig
from forest_perception.sim.weather import get_weather
from forest_perception.sim.world import generate_world


def render_fps(scene: ForestScene, world, intrinsics: CameraIntrinsics, n: int) -> tuple[float, float]:
    """Raw renders and full camera frames (render + camera pipeline + depth model) per second."""
    sim = ForestSimulator(world, SimConfig(camera=intrinsics), [RoverConfig(weather="sunny")], scene=scene)
    position, rotation = sim.rovers[0].rover.camera_pose()
    weather = get_weather("sunny")
    scene.render(position, rotation, intrinsics, weather)  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        scene.render(position, rotation, intrinsics, weather)
    raw = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(n):
        sim.render_camera(0)
    full = n / (time.perf_counter() - t0)
    sim.close()
    return raw, full


def real_time_factor(world, scene: ForestScene, rovers: int, seconds: float, camera_hz: float,
                     render_workers: int = 0) -> float:
    """Simulated seconds per wall second with ``rovers`` exploring rovers at 320x240."""
    cfgs = [RoverConfig(name=f"rover_{i}", weather=("sunny", "overcast", "dusk")[i % 3]) for i in range(rovers)]
    config = SimConfig(camera_rate_hz=camera_hz, render_workers=render_workers, renderer=scene.renderer)
    sim = ForestSimulator(world, config, cfgs, scene=scene)
    t0 = time.perf_counter()
    sim.run(seconds)
    wall = time.perf_counter() - t0
    sim.close()
    return seconds / wall


def main() -> None:
    """Print the benchmark table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="simulated seconds per RTF run")
    parser.add_argument("--frames", type=int, default=30, help="renders per resolution")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rovers", type=int, nargs="+", default=[1, 3, 5], help="rover counts to measure")
    parser.add_argument("--renderers", nargs="+", choices=("opengl", "tiny"), default=["opengl", "tiny"],
                        help="renderers to measure (default both)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="render_workers settings to measure at 15 Hz (default 0 1 2)")
    args = parser.parse_args()
    if any(n < 1 for n in args.rovers):
        parser.error(f"--rovers must all be >= 1, got {args.rovers}")
    problem = egl_problem()
    renderers = [r for r in args.renderers if r != "opengl" or problem is None]
    if problem is not None and "opengl" in args.renderers:
        print(f"opengl skipped: {problem}")

    world = generate_world(seed=args.seed)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )
    print(
        f"world: seed {args.seed}, {len(world.trees)} trees, {len(world.logs)} logs, "
        f"{len(world.bushes)} bushes, {len(world.rocks)} rocks on {world.config.size_m:.0f} m square"
    )
    scenes = {}
    for name in renderers:
        t0 = time.perf_counter()
        scenes[name] = ForestScene(world, renderer=name)
        gl = getattr(scenes[name], "_gl", None)
        device = f" ({gl.renderer_name})" if gl is not None else ""
        print(f"{name} scene build: {time.perf_counter() - t0:.2f} s{device}")
    print()
    print(f"{'renderer':>8} {'resolution':>12} {'raw render fps':>15} {'camera frame fps':>17} {'ms/frame':>9}")
    raw_fps: dict[tuple[str, int], float] = {}
    for w, h in ((320, 240), (640, 480)):
        for name, scene in scenes.items():
            raw, full = render_fps(scene, world, CameraIntrinsics(w, h), args.frames)
            raw_fps[name, w] = raw
            print(f"{name:>8} {w:>8}x{h:<3} {raw:>15.1f} {full:>17.1f} {1000 / full:>9.1f}")
        if len(scenes) == 2:
            print(f"{'':>8} {'':>12} opengl/tiny raw render speed: {raw_fps['opengl', w] / raw_fps['tiny', w]:.2f}x")
    print()
    print(
        f"{'renderer':>8} {'rovers':>6} {'camera Hz':>9} {'render workers':>14} {'real-time factor':>17} "
        f"{'vs inline':>9}   (320x240, IMU 200 Hz, GPS 10 Hz, encoders 50 Hz)"
    )
    for rovers in args.rovers:
        for hz, workers in ((15.0, tuple(args.workers)), (30.0, (0,))):
            for name, scene in scenes.items():
                inline = None
                for n in workers:
                    rtf = real_time_factor(world, scene, rovers, args.seconds, hz, n)
                    inline = rtf if inline is None else inline
                    print(f"{name:>8} {rovers:>6} {hz:>9.0f} {n:>14} {rtf:>17.2f} {rtf / inline:>8.2f}x")
    for scene in scenes.values():
        scene.close()
    np.set_printoptions()


if __name__ == "__main__":
    main()
