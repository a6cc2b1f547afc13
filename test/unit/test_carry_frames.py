"""scripts/carry_frames.py: frames packed for a lent GPU machine come back in the dataset layout, depth within 1.2 %."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "carry_frames.py"


@pytest.fixture(scope="module")
def carry():
    spec = importlib.util.spec_from_file_location("carry_frames", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_depth_codes_keep_invalid_pixels_and_relative_error_within_one_percent(carry):
    depth = np.array([[0, 50, 100, 999, 5000, 9995, 12000]], np.uint16)
    back = carry.decode_depth(carry.encode_depth(depth))
    assert back[0, 0] == 0 and (back[0, 1:] > 0).all()
    rel = np.abs(back[0, 1:].astype(float) - depth[0, 1:]) / depth[0, 1:]
    assert rel.max() < 0.012


def test_pack_and_unpack_restore_the_layout(carry, tmp_path):
    seg = tmp_path / "src" / "Run-1" / "a"
    for sub in ("rgb_image", "depth_image"):
        (seg / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    depth = (rng.random((48, 64)) * 9000 + 500).astype(np.uint16)
    depth[0, :5] = 0
    cv2.imwrite(str(seg / "rgb_image" / "000001.png"), rgb)
    cv2.imwrite(str(seg / "depth_image" / "000001.png"), depth)
    (seg / "metadata.csv").write_text("timestamp\n0.0\n")
    carry.main(["pack", str(tmp_path / "c.pkl"), str(tmp_path / "src")])
    carry.main(["unpack", str(tmp_path / "out"), str(tmp_path / "c.pkl"), "--processes", "1"])
    out = tmp_path / "out" / "src" / "Run-1" / "a"
    assert (out / "metadata.csv").read_text() == "timestamp\n0.0\n"
    back = cv2.imread(str(out / "depth_image" / "000001.png"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and (back[0, :5] == 0).all()
    assert (np.abs(back[1:].astype(float) - depth[1:]) / depth[1:]).max() < 0.012
    assert cv2.imread(str(out / "rgb_image" / "000001.png")).shape == rgb.shape


def test_a_depth_png_that_is_not_16_bit_is_refused_by_name(carry, tmp_path):
    seg = tmp_path / "src" / "Run-1" / "a"
    for sub in ("rgb_image", "depth_image"):
        (seg / sub).mkdir(parents=True)
    cv2.imwrite(str(seg / "rgb_image" / "000001.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(seg / "depth_image" / "000001.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="000001.png.*16-bit depth"):
        carry.main(["pack", str(tmp_path / "c.pkl"), str(tmp_path / "src")])
