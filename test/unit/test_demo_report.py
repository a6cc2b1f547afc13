"""The demo's HTML run report: sections in order, tables, pictures inlined, text escaped."""

from __future__ import annotations

import base64

from forest_perception.demo import report


def test_report_inlines_pictures_and_escapes_text(tmp_path):
    rounds = [{"round": 1, "bytes_down": 2e6, "bytes_up": 1.5e6}, {"round": 2, "bytes_down": 2e6, "bytes_up": 1.4e6}]
    accuracy = {0: {"absrel": 0.3, "delta1": 0.6}, 1: {"absrel": 0.2, "delta1": 0.7},
                2: {"absrel": 0.15, "delta1": 0.8}}
    curves = report.plot_rounds(accuracy, rounds, tmp_path / "rounds.png")
    bars = report.plot_before_after({"rover_0": {"absrel": 0.3}}, {"rover_0": {"absrel": 0.2}}, tmp_path / "ba.png")
    kept = report.plot_data_kept({"rover_0": 40}, {"rover_0": 9_000_000}, {"rover_0": 3_000_000}, tmp_path / "k.png")
    sections = [
        report.Section("1. <Forest>").text("a & b").table(["x", "y"], [[1, 0.12345], ["z", "w"]]),
        report.Section("2. Pictures").image(curves, "curves").image(bars, "bars").image(kept, "kept")
        .image(tmp_path / "missing.png", "skipped").lines(["line <1>", "line 2"]),
    ]
    path = report.write_report(tmp_path / "report.html", "run", sections, 125.0)
    page = path.read_text()
    assert page.index("1. &lt;Forest&gt;") < page.index("2. Pictures")
    assert "a &amp; b" in page and '<td class="num">0.123</td>' in page and "line &lt;1&gt;" in page
    assert page.count("data:image/png;base64,") == 3 and "skipped" not in page
    inlined = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(inlined) == curves.read_bytes()
    assert "2.1 min in all" in page
    assert report.folder_bytes(tmp_path / "nothing") == 0 and report.folder_bytes(tmp_path) > 0
