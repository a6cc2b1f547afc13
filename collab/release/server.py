"""The release server: announcements (long poll), artefact downloads (HTTP ranges, for resuming) and rover
reports over HTTPS, on Starlette served by uvicorn.

- ``GET /v1/announce?rover=ID&groups=A,B&hardware=pc&have=RELEASE&wait=S``: the release the rover should run, held
  open up to ``wait`` s while it is still ``have`` (the push);
- ``GET /v1/objects/<sha256>``: one artefact (``Range`` requests resume a download);
- ``POST /v1/report``: ``{"rover", "release", "kind", "metrics", "reason"}`` from the signing rover;
- ``GET /v1/status``: releases, rollouts and rovers.

With rover keys (``forest-fl certs`` folder) every request must be signed by a known rover
(:mod:`forest_perception.collab.release.auth`); the server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from forest_perception.collab.deploy.certs import DEFAULT_HOSTS, load_deployment_certs, make_tls_cert
from forest_perception.collab.release.auth import AuthError, verify_request
from forest_perception.collab.release.hardware import HARDWARE_CLASSES
from forest_perception.collab.release.registry import RegistryError, ReleaseRegistry, RoverInfo

MAX_WAIT_S = 60.0
SERVER_CERT = "release-server.crt"
SERVER_KEY = "release-server.key"


def server_certificate(certs_dir: str | os.PathLike, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> tuple[Path, Path]:
    """The release server's TLS certificate and key in a ``forest-fl certs`` folder, signed by its CA (made on
    first use)."""
    certs = load_deployment_certs(certs_dir)
    cert, key = certs.root / SERVER_CERT, certs.root / SERVER_KEY
    if not (cert.is_file() and key.is_file()):
        make_tls_cert(certs.ca_cert, certs.ca_key, cert, key, "forest-fl release server", hosts)
    return cert, key


def make_app(registry: ReleaseRegistry, rover_keys: Mapping[str, Any] | None = None, poll_s: float = 0.25,
             stopping: threading.Event | None = None) -> Any:  # noqa: ANN401 - a Starlette app
    """The ASGI app over ``registry``; ``rover_keys`` (rover id -> public key) turns authentication on."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route

    stopping = stopping or threading.Event()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def authenticate(request: Request, body: bytes) -> str | None:
        if rover_keys is None:
            return None
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return verify_request(rover_keys, request.headers, request.method, target, body)

    async def announce(request: Request) -> Response:
        try:
            signer = authenticate(request, b"")
            q = request.query_params
            rover = RoverInfo(q.get("rover", ""), tuple(g for g in q.get("groups", "").split(",") if g),
                              q.get("hardware", ""))
            if not rover.id or (signer is not None and signer != rover.id):
                raise AuthError(f"announce for rover {rover.id!r} signed by {signer!r}")
            if rover.hardware not in HARDWARE_CLASSES:
                return error(400, f"hardware {rover.hardware!r} is not one of {', '.join(HARDWARE_CLASSES)}")
            wait = min(MAX_WAIT_S, max(0.0, float(q.get("wait", "0") or 0)))
            have = q.get("have", "")
            deadline = time.monotonic() + wait
            await run_in_threadpool(registry.register, rover)  # once a request, not on every poll below
            while True:
                answer = await run_in_threadpool(registry.assignment, rover)
                if (answer.release or "") != have or time.monotonic() >= deadline or stopping.is_set():
                    return JSONResponse(answer.to_dict())
                import anyio

                await anyio.sleep(poll_s)
        except AuthError as exc:
            return error(401, str(exc))
        except (RegistryError, ValueError) as exc:
            return error(400, str(exc))

    async def objects(request: Request) -> Response:
        try:
            authenticate(request, b"")
            path = registry.object_path(request.path_params["sha256"])
        except AuthError as exc:
            return error(401, str(exc))
        except RegistryError as exc:
            return error(400, str(exc))
        if not path.is_file():
            return error(404, f"no artefact {request.path_params['sha256']}")
        return FileResponse(path, media_type="application/octet-stream")

    async def report(request: Request) -> Response:
        body = await request.body()
        try:
            signer = authenticate(request, body)
            data = json.loads(body or b"{}")
            if not isinstance(data, dict):
                raise ValueError("a report is a JSON object")
            rover = str(data.get("rover", ""))
            if signer is not None and signer != rover:
                raise AuthError(f"report for rover {rover!r} signed by {signer!r}")
            events = await run_in_threadpool(registry.report, rover, str(data.get("release", "")),
                                             str(data.get("kind", "")), data.get("metrics") or {},
                                             str(data.get("reason", "")))
            return JSONResponse({"ok": True, "events": events})
        except AuthError as exc:
            return error(401, str(exc))
        except (RegistryError, ValueError) as exc:
            return error(400, str(exc))

    async def status(request: Request) -> Response:
        try:
            authenticate(request, b"")
        except AuthError as exc:
            return error(401, str(exc))
        return JSONResponse(await run_in_threadpool(registry.status))

    return Starlette(routes=[
        Route("/v1/announce", announce), Route("/v1/objects/{sha256}", objects), Route("/v1/report", report,
                                                                                        methods=["POST"]),
        Route("/v1/status", status),
    ])


class ReleaseServer:
    """The server in a background thread (the demo, tests, ``forest-fl release serve``); ``stop()`` ends it."""

    def __init__(self, registry: ReleaseRegistry, host: str = "127.0.0.1", port: int = 8470,
                 certfile: str | os.PathLike | None = None, keyfile: str | os.PathLike | None = None,
                 rover_keys: Mapping[str, Any] | None = None, log_level: str = "warning") -> None:
        import uvicorn

        self.stopping = threading.Event()
        self.host, self.port = host, int(port)
        self.tls = certfile is not None
        config = uvicorn.Config(make_app(registry, rover_keys, stopping=self.stopping), host=host, port=self.port,
                                ssl_certfile=certfile, ssl_keyfile=keyfile, log_level=log_level,
                                timeout_graceful_shutdown=2, lifespan="off", access_log=False, ws="none")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``https://127.0.0.1:PORT`` (``http`` without a certificate)."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> ReleaseServer:
        """Start serving; return once it listens (``RuntimeError`` if it does not)."""
        self._thread = threading.Thread(target=self._server.run, name="release-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"release server did not start on {self.host}:{self.port} (port in use?)")
            time.sleep(0.05)
        return self

    def run(self) -> None:
        """Serve in this thread until interrupted."""
        self._server.run()

    def stop(self) -> None:
        """Close long polls, stop serving and wait for the thread."""
        self.stopping.set()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10.0)
