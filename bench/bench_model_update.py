"""Latency of the shipped ONNX models against the same models at an earlier git revision, side by side.

A retrained network must stay within 1.2x of the latency of the one it replaces (issue 11). Both versions run in
ONNX Runtime with the same threads on the same frames, interleaved round by round so that load on the machine
hits both alike; prints the median of each and the ratio new / old.

    .venv/bin/python bench/bench_model_update.py [--rev REV] [--models multiscale_320x240 ...] [--rounds 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forest_perception.cli_args import positive_int  # noqa: E402
from forest_perception.depth_pipeline import synthetic_forest_image  # noqa: E402
from forest_perception.inference import OnnxDepthEngine  # noqa: E402
from forest_perception.models.weights import shipped_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _old_model(rev: str, name: str, folder: Path) -> Path | None:
    """The model file ``name`` as it was at ``rev`` (None when it did not exist there)."""
    path = f"models/weights/{name}.onnx"
    done = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, check=False)
    if done.returncode != 0:
        return None
    out = folder / f"{name}.onnx"
    out.write_bytes(done.stdout)
    return out


def main(argv: list[str] | None = None) -> int:
    """Print old / new median latency and their ratio for every model; returns an exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD~1", help="git revision of the old models (default: HEAD~1)")
    parser.add_argument("--models", nargs="+", default=["multiscale_320x240", "multiscale_320x240_int8"])
    parser.add_argument("--rounds", type=positive_int, default=8, help="interleaved rounds of 5 frames each")
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args(argv)
    frames = [synthetic_forest_image(240, 320, seed=s) for s in range(5)]
    print(f"{'model':<28} {'old (' + args.rev + ') ms':>16} {'new ms':>8} {'new/old':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            old_path = _old_model(args.rev, name, Path(tmp))
            if old_path is None:
                print(f"{name:<28} not shipped at {args.rev}")
                continue
            engines = {"old": OnnxDepthEngine(old_path, threads=args.threads),
                       "new": OnnxDepthEngine(shipped_model(name), threads=args.threads)}
            times: dict[str, list[float]] = {"old": [], "new": []}
            for round_index in range(args.rounds + 1):  # round 0 warms up
                for key, engine in engines.items():
                    for frame in frames:
                        start = time.perf_counter()
                        engine.predict(frame)
                        if round_index:
                            times[key].append((time.perf_counter() - start) * 1e3)
            old, new = (float(np.median(times[k])) for k in ("old", "new"))
            print(f"{name:<28} {old:16.1f} {new:8.1f} {new / old:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
