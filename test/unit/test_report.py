"""HTML dataset report (dataset_tools.report): self-contained page with plots, examples, curation, splits."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from forest_perception.dataset_tools.cli import main as dataset_cli
from forest_perception.dataset_tools.curate import CurateConfig, curate
from forest_perception.dataset_tools.layout import FrameRecord, GpsFix, ImuSample, SegmentWriter, frame_stem
from forest_perception.dataset_tools.report import build_report
from forest_perception.dataset_tools.split import split_dataset, write_splits

H, W = 48, 64
VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Checker(HTMLParser):
    """Collects tags, image sources and headings; fails on unbalanced tags."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[tuple[str, str]] = []
        self.headings: list[str] = []
        self._in_h2 = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append((attrs.get("src", ""), attrs.get("alt", "")))
        if tag not in VOID:
            self.stack.append(tag)
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()
        self._in_h2 = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.headings.append(data.strip())


def _parse(path: Path) -> _Checker:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert checker.stack == [], checker.stack
    assert "src=\"http" not in text and "<script" not in text  # self-contained, nothing fetched
    return checker


def _decode_uri(uri: str) -> np.ndarray:
    m = re.match(r"data:image/(png|jpeg);base64,(.+)$", uri)
    assert m, uri[:40]
    data = base64.b64decode(m.group(2))
    assert data[:8] == b"\x89PNG\r\n\x1a\n" if m.group(1) == "png" else data[:2] == b"\xff\xd8"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] > 50 and image.shape[1] > 50
    return image


def _texture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (H // 4, W // 4, 3), dtype=np.uint8)
    return cv2.resize(small, (W, H), interpolation=cv2.INTER_NEAREST)


def _dataset(root: Path, gps: bool = True, segments: str = "abc", n: int = 8) -> None:
    for k, seg in enumerate(segments):
        with SegmentWriter(root, 1, seg) as writer:
            for i in range(n):
                rgb = _texture(100 * k + i)
                if i == 3:
                    rgb = cv2.GaussianBlur(rgb, (0, 0), 3.0)
                depth = np.full((H, W), 0.5 + i, np.float32)
                depth[:, :5] = np.nan
                writer.write_frame(
                    rgb,
                    depth,
                    FrameRecord(
                        frame_stem(i),
                        1.0 + i,
                        ImuSample((0, 0, 0), (0, 0, 9.8)),
                        gps=GpsFix(50.0 + 1e-4 * i, 8.0 + 1e-3 * k) if gps else None,
                    ),
                )


def test_report_of_a_curated_and_split_dataset(tmp_path):
    _dataset(tmp_path / "src")
    curate(tmp_path / "src", tmp_path / "cur", CurateConfig(count=12, workers=1))
    write_splits(split_dataset(tmp_path / "cur", seed=0, fractions="0.34,0.33,0.33"))

    path = build_report(tmp_path / "cur", examples=4)
    assert path == tmp_path / "cur" / "report.html"
    page = _parse(path)
    assert page.headings == ["Summary", "Curation", "GPS track", "Sharpness", "Depth", "Example frames", "Splits"]
    alts = [alt for _, alt in page.images]
    assert alts == [
        "GPS track coloured by curation decision",
        "GPS track coloured by split",
        "sharpness histograms",
        "depth histograms",
        "example frames",
        "frames per split",
    ]
    images = {alt: _decode_uri(src) for src, alt in page.images}
    assert images["example frames"].shape[0] >= 2 * 240  # 4 examples, two per row, 320 px wide tiles
    text = " ".join(page.text)
    assert "kept 12 of 24 input frames" in text
    assert re.search(r"blurry\s+3", text)  # one blurred frame per segment, counted in the curation table
    assert "blur_ratio 0.35" in text
    splits = [r for r in text.split() if r in ("train", "val", "test")]
    assert {"train", "val", "test"} <= set(splits)

    with pytest.raises(FileExistsError, match="report.html already exists"):
        build_report(tmp_path / "cur")
    assert build_report(tmp_path / "cur", overwrite=True, examples=0) == path
    assert [alt for _, alt in _parse(path).images if alt == "example frames"] == []


def test_report_without_gps_curation_or_splits(tmp_path):
    _dataset(tmp_path / "plain", gps=False, segments="a", n=5)
    out = build_report(tmp_path / "plain", tmp_path / "elsewhere" / "r.html", sample=3, examples=2)
    page = _parse(out)
    assert page.headings == ["Summary", "GPS track", "Sharpness", "Depth", "Example frames"]
    text = " ".join(page.text)
    assert "No frame of this dataset has a GPS fix" in text
    assert "3 sampled frames (no curation.csv" in text and "3 of 3 sampled" in text
    assert [alt for _, alt in page.images] == ["sharpness histograms", "depth histograms", "example frames"]
    for src, _ in page.images:
        _decode_uri(src)
    assert not (tmp_path / "plain" / "report.html").exists()


def test_report_refuses_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no Run-<N>/<segment>"):
        build_report(tmp_path / "empty")
    _dataset(tmp_path / "ds", segments="a", n=3)
    (tmp_path / "ds" / "splits.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"ds/splits.json is not a readable splits.json"):
        build_report(tmp_path / "ds")
    with pytest.raises(ValueError, match="is not a curation.csv: missing columns"):
        (tmp_path / "c.csv").write_text("a,b\n1,2\n")
        build_report(tmp_path / "ds", curation=tmp_path / "c.csv", splits=tmp_path / "none.json")
    assert not (tmp_path / "ds" / "report.html").exists()


def test_cli_report(tmp_path, capsys):
    _dataset(tmp_path / "ds", segments="a", n=4)
    assert dataset_cli(["report", str(tmp_path / "ds"), "--out", str(tmp_path / "r.html"), "--sample", "2"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "r.html").stat().st_size > 10_000
    assert dataset_cli(["report", str(tmp_path / "ds"), "--out", str(tmp_path / "r.html")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert dataset_cli(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
