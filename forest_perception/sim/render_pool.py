"""Background camera rendering: worker processes, each owning a :class:`ForestScene` of one world.

PyBullet holds the GIL inside ``getCameraImage`` (two threads rendering two scenes take
as long as one thread rendering both), so parallel rendering needs processes. Every
worker builds its own scene from the same world and build options, so all workers
render identical images for identical jobs; which worker takes a job does not matter.
Workers are ``spawn``-ed (no fork of a process holding PyBullet clients or ROS threads),
are daemons, ignore SIGINT (the owner stops them) and quit when their parent dies.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import traceback
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from forest_perception.frames import CameraIntrinsics, RoverGeometry
    from forest_perception.sim.textures import Palette
    from forest_perception.sim.weather import WeatherPreset
    from forest_perception.sim.world import ForestWorld
    from forest_perception.sim.world_meshes import MeshDetail

MAX_WORKERS = 16
JOBS_PER_WORKER = 2
_POLL_S = 0.5


@dataclass(frozen=True)
class SceneSpec:
    """What a worker needs to build its scene: the world, the scene options and the rover bodies."""

    world: ForestWorld
    cache_dir: str | None = None
    detail: MeshDetail | None = None
    texture_size: int = 256
    cull: bool = True
    texture_seed: int | None = None
    rover_colors: tuple[tuple[float, ...], ...] = ()
    palette: Palette | None = None
    geometry: RoverGeometry | None = None
    renderer: str = "auto"


@dataclass(frozen=True)
class RenderJob:
    """One camera render: camera pose, intrinsics, weather and the pose of every rover body."""

    job_id: int
    position: np.ndarray
    rotation: np.ndarray
    intrinsics: CameraIntrinsics
    weather: WeatherPreset
    bodies: tuple[tuple[np.ndarray, np.ndarray], ...] = ()  # (position, quat_xyzw), in rover_colors order


def _worker_main(spec: SceneSpec, jobs: Any, results: Any) -> None:  # noqa: ANN401 - mp queues
    """Worker loop: build the scene, then render jobs until a ``None`` job or the parent's death."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from forest_perception.sim.scene import ForestScene

    try:
        scene = ForestScene(spec.world, cache_dir=spec.cache_dir, detail=spec.detail,
                            texture_size=spec.texture_size, cull=spec.cull, texture_seed=spec.texture_seed,
                            palette=spec.palette, renderer=spec.renderer)
        body_ids = [scene.add_rover_body(color=c, geometry=spec.geometry) for c in spec.rover_colors]
    except BaseException:  # noqa: BLE001 - report any build failure to the owner
        results.put(("error", -1, traceback.format_exc()))
        return
    results.put(("ready", -1, None))
    parent = mp.parent_process()
    try:
        while True:
            try:
                job = jobs.get(timeout=_POLL_S)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return
                continue
            if job is None:
                return
            try:
                for body, (pos, quat) in zip(body_ids, job.bodies):
                    scene.set_body_pose(body, pos, quat)
                rgb, depth, _seg = scene.render(job.position, job.rotation, job.intrinsics, job.weather)
                results.put(("frame", job.job_id, (rgb, depth)))
            except Exception:  # noqa: BLE001 - the owner raises it
                results.put(("error", job.job_id, traceback.format_exc()))
    finally:
        scene.close()


def _stop_workers(procs: list[Any], jobs: Any, results: Any) -> None:  # noqa: ANN401 - mp objects
    """Ask workers to quit, drain their output so they can exit, terminate stragglers."""
    for proc in procs:
        if proc.is_alive():
            try:
                jobs.put(None)
            except (OSError, ValueError):
                pass
    for proc in procs:
        if proc.pid is None:  # never started
            continue
        for _ in range(10):  # up to ~5 s each: a worker may be finishing a render
            proc.join(timeout=_POLL_S)
            if not proc.is_alive():
                break
            try:  # a worker blocked on a full results pipe cannot exit until it is read
                while True:
                    results.get_nowait()
            except (queue.Empty, OSError, ValueError, EOFError):
                pass
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2.0)
    for q in (jobs, results):
        q.cancel_join_thread()
        q.close()


class RenderPool:
    """``workers`` background renderers of one scene spec, with at most ``JOBS_PER_WORKER`` jobs each in flight.

    :meth:`submit` blocks while the pool is full; :meth:`result` returns a finished job's
    ``(rgb, depth)`` (raw renderer output, as :meth:`ForestScene.render` gives it).
    The constructor returns once every worker has built its scene.
    """

    def __init__(self, spec: SceneSpec, workers: int, jobs_per_worker: int = JOBS_PER_WORKER) -> None:
        if not (isinstance(workers, int) and 1 <= workers <= MAX_WORKERS):
            raise ValueError(f"workers must be an integer within [1, {MAX_WORKERS}], got {workers!r}")
        ctx = mp.get_context("spawn")
        self._jobs = ctx.Queue()
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker_main, args=(spec, self._jobs, self._results), daemon=True,
                        name=f"forest_render_{i}")
            for i in range(workers)
        ]
        self._finalizer = weakref.finalize(self, _stop_workers, self._procs, self._jobs, self._results)
        self.max_in_flight = workers * max(1, int(jobs_per_worker))
        self._in_flight: set[int] = set()
        self._done: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._next_id = 0
        try:
            for proc in self._procs:
                proc.start()
            ready = 0
            while ready < workers:
                kind, _job, payload = self._get(block=True)
                if kind == "error":
                    raise RuntimeError(f"a render worker could not build its scene:\n{payload}")
                ready += kind == "ready"
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> int:
        """Number of worker processes."""
        return len(self._procs)

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not yet finished."""
        return len(self._in_flight)

    def _get(self, block: bool) -> tuple[str, int, Any]:
        """Next worker message; while blocking, raise if every worker has died."""
        while True:
            try:
                return self._results.get(timeout=_POLL_S) if block else self._results.get_nowait()
            except queue.Empty:
                if not block:
                    raise
                if self._finalizer.alive and not any(p.is_alive() for p in self._procs):
                    raise RuntimeError(
                        "all render workers died (a script that starts them needs an "
                        "`if __name__ == '__main__':` guard: workers are spawned and import __main__)"
                    ) from None
                if not self._finalizer.alive:
                    raise RuntimeError("the render pool is closed") from None

    def _collect(self, block: bool) -> bool:
        """Store one finished job (waiting for one if ``block``); False if none was ready."""
        try:
            kind, job_id, payload = self._get(block)
        except queue.Empty:
            return False
        if kind == "error":
            self._in_flight.discard(job_id)
            raise RuntimeError(f"render job {job_id} failed in a worker:\n{payload}")
        if kind == "frame":
            self._in_flight.discard(job_id)
            self._done[job_id] = payload
        return True

    def submit(self, position: np.ndarray, rotation: np.ndarray, intrinsics: CameraIntrinsics,
               weather: WeatherPreset, bodies: tuple[tuple[np.ndarray, np.ndarray], ...] = ()) -> int:
        """Queue a render and return its job id; blocks while ``max_in_flight`` jobs are pending."""
        if not self._finalizer.alive:
            raise RuntimeError("the render pool is closed")
        while len(self._in_flight) >= self.max_in_flight:
            self._collect(block=True)
        job_id = self._next_id
        self._next_id += 1
        self._jobs.put(RenderJob(job_id, np.array(position, dtype=np.float64), np.array(rotation, dtype=np.float64),
                                 intrinsics, weather, bodies))
        self._in_flight.add(job_id)
        return job_id

    def poll(self) -> None:
        """Take in every result that is already there, without waiting."""
        while self._collect(block=False):
            pass

    def ready(self, job_id: int) -> bool:
        """Whether ``job_id`` has finished (call :meth:`poll` first to take in new results)."""
        return job_id in self._done

    def result(self, job_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Wait for ``job_id`` and return its ``(rgb, depth)``; each result can be taken once."""
        while job_id not in self._done:
            if job_id not in self._in_flight:
                raise KeyError(f"render job {job_id} is unknown or was already taken")
            self._collect(block=True)
        return self._done.pop(job_id)

    def close(self) -> None:
        """Stop the workers (pending jobs are dropped); safe to call twice."""
        self._in_flight.clear()
        self._done.clear()
        self._finalizer()
