"""Releases as the rover's model source: a background thread holds a long poll open on the release server (the
push), the agent pulls and gates what it is told to run, and the thread reports back (installed, refused, health).

:class:`ReleaseSource` is a model source (:mod:`forest_perception.collab.rover.sources`) whose candidates are
*assigned*: the coordinator says which release this rover should run, so a release the rover accepted before is
switched back to at once, and an announcement of no release takes the rover back to the model it ran before any
release (:meth:`~forest_perception.collab.rover.agent.CollabAgent.poll`). See ``docs/releases.md``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from forest_perception.collab.release.client import ReleaseClient, ReleaseRefusedError, ReleaseUnavailableError
from forest_perception.collab.release.registry import Announcement
from forest_perception.collab.rover.models import GlobalModel
from forest_perception.collab.rover.sources import CandidateRef, SourceUnavailableError

NO_RELEASE_KEY = "release:none"


def release_key(release: str) -> str:
    """The ledger key of a release."""
    return f"release:{release}"


@dataclass
class DepthHealth:
    """The depth node's health from its /diagnostics values, as a release report carries it: inference latency
    (p50, ms), output rate (Hz) and inference errors since the model last changed (``crashes``)."""

    latency_ms: float | None = None
    rate_hz: float | None = None
    errors: int = 0
    errors_at_swap: int | None = None
    model_file: str = ""
    history: list[tuple[float, float, float]] = field(default_factory=list)

    def update(self, values: Mapping[str, str], now: float | None = None) -> None:
        """Take one depth_node diagnostics status's key/values (strings)."""
        def number(key: str) -> float | None:
            try:
                value = float(values[key])
            except (KeyError, ValueError):
                return None
            return value if value == value else None

        model_file = str(values.get("model_file", ""))
        errors = int(number("inference_errors") or 0)
        if model_file != self.model_file or self.errors_at_swap is None:
            self.model_file, self.errors_at_swap = model_file, errors
            self.history.clear()
        self.errors = errors
        latency, rate = number("inference_ms_p50"), number("rate_hz")
        if latency is not None and latency > 0 and rate is not None and rate > 0:
            self.latency_ms, self.rate_hz = latency, rate
            self.history.append((time.monotonic() if now is None else now, latency, rate))
            del self.history[:-30]

    def metrics(self) -> dict[str, float] | None:
        """``{"latency_ms", "rate_hz", "crashes"}`` averaged since the last report, or None before any frame."""
        if not self.history:
            return None
        latency = sum(h[1] for h in self.history) / len(self.history)
        rate = sum(h[2] for h in self.history) / len(self.history)
        self.history.clear()
        return {"latency_ms": latency, "rate_hz": rate, "crashes": float(self.errors - (self.errors_at_swap or 0))}


class ReleaseSource:
    """A release server as the rover's model source (see the module docstring)."""

    def __init__(self, client: ReleaseClient, health: Callable[[], dict[str, float] | None] = lambda: None,
                 wait_s: float = 30.0, retry_s: float = 5.0, report_period_s: float = 10.0,
                 log: Callable[[str], Any] = lambda message: None) -> None:
        self.client = client
        self.health = health
        self.wait_s, self.retry_s, self.report_period_s = float(wait_s), float(retry_s), float(report_period_s)
        self.log = log
        self.announcement: Announcement | None = None
        self.error = ""
        self.running_release = ""  # what the agent runs now ("" = no release: the shipped or a local model)
        self._reports: list[tuple[str, str, dict[str, float], str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="release-source", daemon=True)
        self._started = False

    # ------------------------------------------------------------------------------------------ thread
    def start(self) -> ReleaseSource:
        """Start the announcement and report thread."""
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread (a long poll in flight ends with its timeout)."""
        self._stop.set()
        self._wake.set()
        if self._started:
            self._thread.join(timeout=self.wait_s + self.client.timeout_s + 1)
        self.client.session.close()

    def _loop(self) -> None:
        next_report = time.monotonic() + self.report_period_s
        while not self._stop.is_set():
            try:
                # the first call answers at once; later ones wait for a change or the next report, whichever first
                have = (self.announcement.release or "") if self.announcement else "\0"
                wait = max(0.0, min(self.wait_s, next_report - time.monotonic())) if self.announcement else 0.0
                answer = self.client.announce(have=have, wait_s=wait)
                with self._lock:
                    if self.announcement is None or answer.release != self.announcement.release:
                        self.log(f"release server: run {answer.release or 'no release'}")
                    self.announcement, self.error = answer, ""
                self._send_reports()
                if time.monotonic() >= next_report:
                    next_report = time.monotonic() + self.report_period_s
                    metrics = self.health()
                    if metrics:
                        self.client.report(self.running_release, "health", metrics)
            except ReleaseUnavailableError as exc:
                with self._lock:
                    self.error = str(exc)
                self._wake.wait(self.retry_s)
                self._wake.clear()

    def _send_reports(self) -> None:
        while True:
            with self._lock:
                if not self._reports:
                    return
                release, kind, metrics, reason = self._reports[0]
            self.client.report(release, kind, metrics, reason)  # ReleaseUnavailableError: kept, sent on the next turn
            with self._lock:
                self._reports.pop(0)

    def queue_report(self, release: str, kind: str, metrics: Mapping[str, float] | None = None,
                     reason: str = "") -> None:
        """Send a report from the source's thread (never blocks the caller on the network)."""
        with self._lock:
            self._reports.append((release, kind, dict(metrics or {}), reason))
        self._wake.set()

    # ------------------------------------------------------------------------------------------ model source
    def latest(self) -> CandidateRef | None:
        """What the coordinator says this rover should run (None before the first answer)."""
        with self._lock:
            if self.error and self.announcement is None:
                raise ValueError(self.error)
            answer = self.announcement
        if answer is None:
            return None
        if answer.release is None:
            return CandidateRef(NO_RELEASE_KEY, None, "no-release", "", assigned=True)
        return CandidateRef(release_key(answer.release), None, answer.release, answer.release, assigned=True)

    def load(self, ref: CandidateRef) -> GlobalModel:
        """Pull, verify and install the release (``ValueError`` if refused, :class:`SourceUnavailableError` if it
        cannot be installed now)."""
        with self._lock:
            answer = self.announcement
        if answer is None or answer.release != ref.location:
            raise SourceUnavailableError(f"release {ref.location} is no longer announced")
        started, before = time.perf_counter(), self.client.bytes_downloaded
        try:
            installed = self.client.fetch(answer)
        except ReleaseRefusedError as exc:
            raise ValueError(f"release {ref.location} refused ({exc.code}): {exc}") from None
        except ReleaseUnavailableError as exc:
            self.queue_report(ref.location, "failed", {}, f"{exc.code}: {exc}")
            raise SourceUnavailableError(str(exc)) from None
        except OSError as exc:
            self.queue_report(ref.location, "failed", {}, str(exc))
            raise SourceUnavailableError(f"release {ref.location}: {exc}") from None
        self.log(f"release {ref.location}: {self.client.bytes_downloaded - before} bytes pulled and verified in "
                 f"{time.perf_counter() - started:.1f} s")
        meta = {"onnx": str(installed.onnx), "release": installed.release, "command": f"release {installed.release}"}
        return GlobalModel(None, [], [], meta, str(installed.path))

    def decided(self, ref: CandidateRef, accepted: bool, deployed: bool, code: str, reason: str,
                metrics: Mapping[str, float]) -> None:
        """The agent's verdict on an assigned release: reported back (installed or refused)."""
        if ref.key == NO_RELEASE_KEY:
            return
        if deployed:
            self.running_release = ref.location
            self.queue_report(ref.location, "installed", metrics, reason)
        elif not accepted:
            self.queue_report(ref.location, "refused", metrics, f"{code}: {reason}")

    def switched(self, release: str, previous: str) -> None:
        """The rover runs ``release`` now ("" none) after going back from ``previous``."""
        self.running_release = release
        if previous:
            self.queue_report(previous, "rolled_back", {}, f"now running {release or 'the model before releases'}")


def is_release_url(location: str) -> bool:
    """Whether a ``model_source`` names a release server (``https://host:port``)."""
    return str(location).startswith(("https://", "http://"))


def release_source_problem(p: Mapping[str, Any]) -> str:
    """Why collab_node's parameters cannot reach a release server ("" if they can, or if none is asked for)."""
    from pathlib import Path

    from forest_perception.collab.release.hardware import HARDWARE_CLASSES

    if not is_release_url(p["model_source"]):
        return ""
    if not str(p["model_source"]).startswith("https://"):
        return f"model_source {p['model_source']!r}: a release server is reached over https:// only"
    if p["hardware_class"] != "auto" and p["hardware_class"] not in HARDWARE_CLASSES:
        return f"hardware_class must be auto or one of {', '.join(HARDWARE_CLASSES)}, got {p['hardware_class']!r}"
    for name, what in (("release_public_key", "the registry's release_signing.pub"),
                       ("root_certificates", "the CA that signed the release server's certificate")):
        if not str(p[name]).strip():
            return f"{name} is not set: a release server needs {what}"
        if not Path(p[name]).is_file():
            return f"{name}: {p[name]} does not exist"
    if str(p["auth_private_key"]).strip() and not Path(p["auth_private_key"]).is_file():
        return f"auth_private_key: {p['auth_private_key']} does not exist"
    return ""


def release_source(p: Mapping[str, Any], rover_id: str, health: Callable[[], dict[str, float] | None],
                   log: Callable[[str], Any]) -> ReleaseSource:
    """The started release source collab_node's parameters describe (check :func:`release_source_problem` first)."""
    from pathlib import Path

    from forest_perception.collab.release.hardware import detect_hardware_class
    from forest_perception.collab.release.registry import RoverInfo

    hardware = detect_hardware_class() if p["hardware_class"] == "auto" else str(p["hardware_class"])
    groups = tuple(g.strip() for g in str(p["rover_groups"]).split(",") if g.strip())
    client = ReleaseClient(str(p["model_source"]), RoverInfo(rover_id, groups, hardware),
                           Path(p["models_dir"]) / "releases", p["release_public_key"], p["root_certificates"],
                           p["auth_private_key"] or None)
    return ReleaseSource(client, health, wait_s=float(p["release_wait_s"]),
                         report_period_s=float(p["release_report_period_s"]), log=log).start()
