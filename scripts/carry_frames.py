"""Carry dataset frames to a lent GPU machine in few bytes, and unpack them there into the dataset layout.

A lent machine takes 64 MiB per call and has no PyBullet to render forests, so frames are rendered here and
packed: RGB as WebP, depth as 8-bit log depth in 0.05-12 m (at most 1.2 % off; 0 = invalid) in lossless WebP, one
pickle per chunk (about 22 KiB per 320x240 frame at quality 72, 26 KiB at 82). ``unpack`` writes RGB PNGs and
16-bit millimetre depth PNGs back, so ``forest-train train`` reads them unchanged
(docs/training.md, "Rounds 1 and 2 on a GPU")::

    python scripts/carry_frames.py pack .gpu/chunk.pkl DATA/g_styles DATA/g_default --quality 85 --limit-mib 45
    # on the GPU machine (16 processes)
    python3 scripts/carry_frames.py unpack .fpwork/data .gpu/chunk.pkl
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np

LOG_LO, LOG_HI = math.log(0.05), math.log(12.0)


def encode_depth(depth_mm: np.ndarray) -> np.ndarray:
    """uint16 millimetres (0 invalid) -> uint8 log depth (0 invalid, 1..255 over 0.05-12 m)."""
    valid = depth_mm > 0
    out = np.zeros(depth_mm.shape, np.uint8)
    log_depth = np.log(np.clip(depth_mm[valid].astype(np.float64) / 1000.0, 0.05, 12.0))
    out[valid] = np.clip(np.round((log_depth - LOG_LO) / (LOG_HI - LOG_LO) * 254.0) + 1, 1, 255).astype(np.uint8)
    return out


def decode_depth(code: np.ndarray) -> np.ndarray:
    """The inverse of :func:`encode_depth`: uint16 millimetres, 0 where invalid."""
    out = np.zeros(code.shape, np.uint16)
    valid = code > 0
    metres = np.exp(LOG_LO + (code[valid].astype(np.float64) - 1) / 254.0 * (LOG_HI - LOG_LO))
    out[valid] = np.round(metres * 1000.0).astype(np.uint16)
    return out


def pack_segment(root: Path, segment: Path, quality: int) -> dict:
    """One segment folder: its small files and every frame, encoded."""
    files = {f: (segment / f).read_bytes() for f in ("metadata.csv", "style.json") if (segment / f).exists()}
    frames = []
    for rgb_path in sorted((segment / "rgb_image").glob("*.png")):
        rgb = cv2.imread(str(rgb_path), cv2.IMREAD_COLOR)
        depth = cv2.imread(str(segment / "depth_image" / rgb_path.name), cv2.IMREAD_UNCHANGED)
        if rgb is None or depth is None or depth.dtype != np.uint16:
            raise ValueError(f"{rgb_path}: needs an RGB PNG and a 16-bit depth PNG of the same name")
        # depth codes as lossless WebP (quality above 100), about 15 % smaller than a PNG of them
        frames.append((rgb_path.stem, cv2.imencode(".webp", rgb, [cv2.IMWRITE_WEBP_QUALITY, quality])[1].tobytes(),
                       cv2.imencode(".webp", encode_depth(depth), [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()))
    return {"rel": str(Path(root.name) / segment.relative_to(root)), "files": files, "frames": frames}


def pack(out: Path, roots: list[Path], quality: int, limit_mib: float) -> None:
    """Pack every segment under ``roots`` into ``out``; refuses to pass ``limit_mib``."""
    segments, size = [], 0
    for root in roots:
        for rgb_dir in sorted(root.rglob("rgb_image")):
            seg = pack_segment(root, rgb_dir.parent, quality)
            size += sum(len(a) + len(b) + 40 for _, a, b in seg["frames"]) + sum(map(len, seg["files"].values()))
            if size > limit_mib * 2**20:
                raise SystemExit(f"carry_frames: over {limit_mib} MiB at {rgb_dir.parent}; pack fewer segments")
            segments.append(seg)
    with open(out, "wb") as f:
        pickle.dump(segments, f, protocol=5)
    n = sum(len(s["frames"]) for s in segments)
    print(f"{out}: {len(segments)} segments, {n} frames, {out.stat().st_size / 2**20:.1f} MiB")


def _write_frame(job: tuple[bytes, bytes, str, str]) -> None:
    rgb, depth, rgb_out, depth_out = job
    cv2.imwrite(rgb_out, cv2.imdecode(np.frombuffer(rgb, np.uint8), cv2.IMREAD_COLOR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    code = cv2.imdecode(np.frombuffer(depth, np.uint8), cv2.IMREAD_UNCHANGED)
    if code.ndim == 3:  # WebP keeps no single-channel images: the code is in every channel
        code = code[..., 0]
    cv2.imwrite(depth_out, decode_depth(code), [cv2.IMWRITE_PNG_COMPRESSION, 1])


def unpack(dest: Path, chunks: list[Path], processes: int) -> None:
    """Write the chunks' segments under ``dest`` in the dataset layout (our own pickles only: never untrusted ones)."""
    jobs = []
    for chunk in chunks:
        with open(chunk, "rb") as f:
            segments = pickle.load(f)  # noqa: S301 - files this script wrote
        for seg in segments:
            folder = dest / seg["rel"]
            for sub in ("rgb_image", "depth_image"):
                (folder / sub).mkdir(parents=True, exist_ok=True)
            for name, data in seg["files"].items():
                (folder / name).write_bytes(data)
            for stem, rgb, depth in seg["frames"]:
                png = f"{stem}.png"
                jobs.append((rgb, depth, str(folder / "rgb_image" / png), str(folder / "depth_image" / png)))
    if processes > 1:
        with Pool(processes) as pool:
            pool.map(_write_frame, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_frame(job)
    print(f"unpacked {len(jobs)} frames into {dest}")


def main(argv: list[str] | None = None) -> int:
    """``pack`` or ``unpack``, see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="dataset roots -> one chunk file")
    p.add_argument("out", type=Path)
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("--quality", type=int, default=85, help="WebP quality of the RGB frames (default: 85)")
    p.add_argument("--limit-mib", type=float, default=56.0, help="refuse a chunk larger than this (default: 56)")
    u = sub.add_parser("unpack", help="chunk files -> dataset layout")
    u.add_argument("dest", type=Path)
    u.add_argument("chunks", type=Path, nargs="+")
    u.add_argument("--processes", type=int, default=16)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.out, args.roots, args.quality, args.limit_mib)
    else:
        unpack(args.dest, args.chunks, args.processes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
