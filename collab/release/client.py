"""The rover's side of releases: ask which release to run, pull its artefacts over HTTPS (resuming), check every
hash and the manifest's signature, and install it whole into a local store that keeps earlier releases.

Store layout (``store_dir``, collab_node's ``<models_dir>/releases``): ``<release id>/`` holds the artefacts
under their file names, ``manifest.json`` and ``signature``; ``.partial/<sha256>.part`` are downloads in progress
(resumed with an HTTP ``Range`` request); ``.staging-*`` is a release being assembled, renamed into place only
when complete. Nothing here touches the model the depth node runs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from forest_perception.collab.release.hardware import fits
from forest_perception.collab.release.registry import FORMAT, ROLES, Announcement, RoverInfo, file_sha256
from forest_perception.collab.release.signing import SignatureError, load_verify_key, verify_manifest

PARTIAL_DIR = ".partial"
DISK_MARGIN_BYTES = 8 << 20
CHUNK = 1 << 16


class ReleaseRefusedError(ValueError):
    """A release this rover will not install: ``code`` is ``unsigned``, ``bad_signature``, ``bad_manifest``,
    ``wrong_hardware``, ``hash_mismatch`` or ``truncated``. Reported to the coordinator as ``refused``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ReleaseUnavailableError(RuntimeError):
    """A release that cannot be installed now but may later: ``code`` ``disk_full`` or ``network``. The running
    model is untouched and nothing is marked decided; reported as ``failed``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


Refused, Unavailable = ReleaseRefusedError, ReleaseUnavailableError  # short names for the raises below


@dataclass(frozen=True)
class InstalledRelease:
    """A release in the rover's store, verified."""

    release: str
    path: Path
    manifest: dict[str, Any]

    @property
    def onnx(self) -> Path:
        """The release's ONNX model file."""
        return self.path / self.artefact("onnx")["file"]

    def artefact(self, role: str) -> dict[str, Any]:
        """The manifest entry of ``role`` (``KeyError`` if the release has none)."""
        for entry in self.manifest["artefacts"]:
            if entry["role"] == role:
                return entry
        raise KeyError(f"release {self.release} has no {role}")


def check_manifest(announcement: Announcement, key: Any, hardware: str) -> dict[str, Any]:  # noqa: ANN401
    """The announced manifest once its signature, format, artefact list and hardware check out;
    :class:`ReleaseRefusedError` otherwise."""
    manifest = announcement.manifest or {}
    try:
        verify_manifest(manifest, announcement.signature, key)
    except SignatureError as exc:
        raise Refused("unsigned" if not announcement.signature else "bad_signature", str(exc)) from None
    release = manifest.get("release")
    if manifest.get("format") != FORMAT or release != announcement.release:
        raise Refused("bad_manifest", f"manifest of {announcement.release!r} is a {manifest.get('format')!r} "
                             f"manifest for {release!r}, expected {FORMAT} for the announced release")
    artefacts = manifest.get("artefacts")
    if not isinstance(artefacts, list) or not any(isinstance(a, dict) and a.get("role") == "onnx" for a in artefacts):
        raise Refused("bad_manifest", f"release {release} lists no ONNX model")
    for entry in artefacts:
        name = str(entry.get("file", ""))
        if (entry.get("role") not in ROLES or not name or Path(name).name != name or name.startswith(".")
                or len(str(entry.get("sha256", ""))) != 64 or not isinstance(entry.get("size"), int)):
            raise Refused("bad_manifest", f"release {release}: malformed artefact entry {entry!r}")
    if not fits(manifest.get("hardware") or [], hardware):
        raise Refused("wrong_hardware", f"release {release} is made for {', '.join(manifest.get('hardware') or [])}"
                             f", this rover is {hardware}")
    return manifest


class ReleaseClient:
    """One rover's connection to the release server and its local release store."""

    def __init__(self, url: str, rover: RoverInfo, store_dir: str | os.PathLike, public_key: str | os.PathLike,
                 ca_cert: str | os.PathLike | None = None, auth_key: str | os.PathLike | None = None,
                 timeout_s: float = 10.0, disk_free: Callable[[Path], int] | None = None) -> None:
        import requests

        from forest_perception.collab.deploy.certs import load_private_key

        self.url = url.rstrip("/")
        self.rover = rover
        self.store = Path(store_dir)
        self.key = load_verify_key(public_key)
        self.timeout_s = float(timeout_s)
        self.disk_free = disk_free or (lambda path: shutil.disk_usage(path).free)
        self._auth = load_private_key(auth_key) if auth_key else None
        self.session = requests.Session()
        # the CA given, never one from REQUESTS_CA_BUNDLE and friends; no proxies from the environment either
        self.session.trust_env = False
        self.session.verify = str(ca_cert) if ca_cert else True
        self.bytes_downloaded = 0

    # ------------------------------------------------------------------------------------------ requests
    def _headers(self, method: str, target: str, body: bytes = b"") -> dict[str, str]:
        if self._auth is None:
            return {}
        from forest_perception.collab.release.auth import sign_request

        return sign_request(self._auth, self.rover.id, method, target, body)

    def _get(self, target: str, timeout: float, **kwargs: Any) -> Any:  # noqa: ANN401 - a requests.Response
        import requests

        headers = {**kwargs.pop("headers", {}), **self._headers("GET", target)}
        try:
            response = self.session.get(self.url + target, headers=headers, timeout=timeout, **kwargs)
        except requests.RequestException as exc:
            raise Unavailable("network", f"release server {self.url}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400 and response.status_code != 416:
            detail = _error_text(response)
            response.close()
            raise Unavailable("network", f"release server {self.url}{target.split('?')[0]}: HTTP "
                                     f"{response.status_code}: {detail}")
        return response

    def announce(self, have: str = "", wait_s: float = 0.0) -> Announcement:
        """The release this rover should run (held open up to ``wait_s`` while it is still ``have``)."""
        query = urlencode({"rover": self.rover.id, "groups": ",".join(self.rover.groups),
                           "hardware": self.rover.hardware, "have": have, "wait": f"{wait_s:g}"})
        response = self._get(f"/v1/announce?{query}", timeout=self.timeout_s + wait_s)
        try:
            return Announcement.from_dict(response.json())
        except ValueError as exc:
            raise Unavailable("network", f"release server {self.url}: bad announcement: {exc}") from None

    def report(self, release: str, kind: str, metrics: dict[str, Any] | None = None, reason: str = "") -> None:
        """Send a report on ``release`` (``installed``, ``health``, ``refused``, ``failed``, ``rolled_back``)."""
        import requests

        body = json.dumps({"rover": self.rover.id, "release": release, "kind": kind, "metrics": metrics or {},
                           "reason": reason}).encode()
        headers = {"Content-Type": "application/json", **self._headers("POST", "/v1/report", body)}
        try:
            response = self.session.post(self.url + "/v1/report", data=body, headers=headers, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise Unavailable("network", f"release server {self.url}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise Unavailable("network", f"report refused: HTTP {response.status_code}: {_error_text(response)}")

    # ------------------------------------------------------------------------------------------ the store
    def installed(self, release: str) -> InstalledRelease | None:
        """The release from the local store if it is there whole and unchanged (every artefact's SHA-256 as its
        manifest says, the manifest as it was signed), else None (it is pulled again)."""
        folder = self.store / release
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            verify_manifest(manifest, (folder / "signature").read_text().strip(), self.key)
            for entry in manifest.get("artefacts", []):
                path = folder / entry["file"]
                if not path.is_file() or path.stat().st_size != entry["size"] or file_sha256(path) != entry["sha256"]:
                    return None
        except (OSError, ValueError, KeyError, TypeError):  # SignatureError is a ValueError
            return None
        return InstalledRelease(release, folder, manifest)

    def fetch(self, announcement: Announcement, progress: Callable[[str, int, int], None] | None = None
              ) -> InstalledRelease:
        """Verify the announced release and install it into the store (or find it there); ``ReleaseRefusedError`` for
        one this rover must never run, ``ReleaseUnavailableError`` for one it cannot install now."""
        if announcement.release is None:
            raise ValueError("the announcement names no release")
        manifest = check_manifest(announcement, self.key, self.rover.hardware)
        have = self.installed(announcement.release)
        if have is not None and have.manifest == manifest:
            return have
        self.store.mkdir(parents=True, exist_ok=True)
        partial = self.store / PARTIAL_DIR
        partial.mkdir(exist_ok=True)
        needed = sum(max(0, a["size"] - _size(partial / f"{a['sha256']}.part")) for a in manifest["artefacts"])
        free = self.disk_free(self.store)
        if needed + DISK_MARGIN_BYTES > free:
            raise Unavailable("disk_full", f"release {announcement.release} needs {needed / 1e6:.1f} MB (and "
                                     f"{DISK_MARGIN_BYTES >> 20} MB to spare) in {self.store}, {free / 1e6:.1f} MB "
                                     "free; the running model is untouched")
        for entry in manifest["artefacts"]:
            self._download(entry, partial / f"{entry['sha256']}.part", announcement.release, progress)
        staging = self.store / f".staging-{announcement.release}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            for entry in manifest["artefacts"]:
                shutil.copyfile(partial / f"{entry['sha256']}.part", staging / entry["file"])
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            (staging / "signature").write_text(str(announcement.signature) + "\n")
            final = self.store / announcement.release
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise Unavailable("disk_full", f"disk full while installing {announcement.release}; the "
                                         "running model is untouched") from None
            raise
        for entry in manifest["artefacts"]:
            (partial / f"{entry['sha256']}.part").unlink(missing_ok=True)
        return InstalledRelease(announcement.release, final, manifest)

    def _download(self, entry: dict[str, Any], part: Path, release: str,
                  progress: Callable[[str, int, int], None] | None) -> None:
        size, digest = int(entry["size"]), str(entry["sha256"])
        have = _size(part)
        if have > size:
            part.unlink()
            have = 0
        if have < size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            response = self._get(f"/v1/objects/{digest}", timeout=self.timeout_s, headers=headers, stream=True)
            if response.status_code == 416:  # nothing at our offset: the server holds less than the manifest says
                response.close()
                part.unlink(missing_ok=True)
                raise Refused("truncated", f"release {release}: the server's {entry['file']} is shorter than the "
                              f"{size} bytes its manifest gives")
            if response.status_code == 200 and have:
                have = 0  # the server ignored the range: start over
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and have + int(length) != size:
                response.close()
                part.unlink(missing_ok=True)
                raise Refused("truncated", f"release {release}: the server sends {have + int(length)} bytes of "
                              f"{entry['file']}, its manifest gives {size}")
            mode = "ab" if have else "wb"
            try:
                with response, open(part, mode) as stream:
                    for block in response.iter_content(CHUNK):
                        if have + len(block) > size:
                            raise Refused("truncated", f"release {release}: {entry['file']} is longer than "
                                                 f"the {size} bytes its manifest gives")
                        stream.write(block)
                        have += len(block)
                        self.bytes_downloaded += len(block)
                        if progress is not None:
                            progress(entry["file"], have, size)
            except ReleaseRefusedError:
                part.unlink(missing_ok=True)
                raise
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    part.unlink(missing_ok=True)
                    raise Unavailable("disk_full", f"disk full while downloading {entry['file']} of "
                                             f"{release}; the running model is untouched") from None
                raise Unavailable("network", f"download of {entry['file']} of {release} broke off at "
                                         f"{have}/{size} bytes ({exc}); it resumes from there") from None
            except Exception as exc:  # noqa: BLE001 - requests' connection errors: keep the part to resume
                raise Unavailable("network", f"download of {entry['file']} of {release} broke off at "
                                         f"{have}/{size} bytes ({type(exc).__name__}); it resumes from "
                                         "there") from None
        if _size(part) < size:
            raise Unavailable("network", f"download of {entry['file']} of {release} stopped at "
                                     f"{_size(part)}/{size} bytes; it resumes from there")
        if file_sha256(part) != digest:
            part.unlink()
            raise Refused("hash_mismatch", f"release {release}: {entry['file']} does not match the SHA-256 "
                                 "its signed manifest gives (tampered or damaged); refused")

    def prune(self, keep: set[str]) -> list[str]:
        """Delete every stored release not in ``keep``; the deleted ids."""
        deleted = []
        if not self.store.is_dir():
            return deleted
        for folder in sorted(self.store.iterdir()):
            if folder.is_dir() and not folder.name.startswith(".") and folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)
                deleted.append(folder.name)
        return deleted


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _error_text(response: Any) -> str:  # noqa: ANN401 - a requests.Response
    try:
        return str(response.json().get("error", ""))[:300]
    except ValueError:
        return response.text[:300]
