"""forest-dataset extract: a bag of rover streams -> synchronised frames in the dataset layout."""

from __future__ import annotations

import numpy as np
import pytest
from rclpy.serialization import serialize_message

from forest_perception import msgs
from forest_perception.dataset_tools.bags import BagError
from forest_perception.dataset_tools.extract import ExtractConfig, extract_bag, find_namespaces
from forest_perception.dataset_tools.layout import (
    decode_depth_mm,
    encode_depth_mm,
    load_frame,
    open_dataset,
    read_segment,
)
from forest_perception.frames import WHEEL_JOINTS, CameraIntrinsics
from forest_perception.recorder import BagRecorder

NS = "/rover_0"
W, H = 64, 48
T0 = 1_000_000_000_000  # 1000 s in ns
TYPES = {
    "camera/image_raw": "sensor_msgs/msg/Image",
    "camera/depth/image_raw": "sensor_msgs/msg/Image",
    "camera/camera_info": "sensor_msgs/msg/CameraInfo",
    "imu/data": "sensor_msgs/msg/Imu",
    "gps/fix": "sensor_msgs/msg/NavSatFix",
    "joint_states": "sensor_msgs/msg/JointState",
}


def _rgb(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _depth(i: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + i)
    depth = rng.uniform(0.3, 9.5, (H, W)).astype(np.float32)
    depth[0, :5] = np.nan  # holes stay holes
    return depth


class _Bag:
    """Writes rover streams into a bag with the project's recorder, messages built with forest_perception.msgs."""

    def __init__(self, path, namespace: str = NS) -> None:
        self.rec = BagRecorder(path, min_free_bytes=0)
        self.ns = namespace
        for rel, type_name in TYPES.items():
            self.rec.add_topic(f"{namespace}/{rel}", type_name)

    def put(self, rel: str, msg, log_ns: int) -> None:
        # the recorder's clock runs on while stamps may jump (a simulator reset): log time = arrival order
        self._log = max(getattr(self, "_log", 0) + 1000, log_ns if log_ns > getattr(self, "_log", 0) else 0)
        self.rec.write(f"{self.ns}/{rel}", serialize_message(msg), self._log)

    def camera(self, i: int, stamp_ns: int, depth_offset_ns: int = 0, depth: bool = True, encoding: str = "rgb8"):
        stamp = msgs.time_from_ns(stamp_ns)
        rgb = _rgb(i)
        if encoding == "bgr8":
            rgb = rgb[:, :, ::-1]
        self.put("camera/image_raw", msgs.image_from_array(rgb, encoding, stamp, "camera_color_optical_frame"),
                 stamp_ns + 3_000_000)
        self.put("camera/camera_info", msgs.camera_info_from_intrinsics(CameraIntrinsics(W, H), stamp, "cam"),
                 stamp_ns + 3_000_000)
        if depth:
            dstamp = msgs.time_from_ns(stamp_ns + depth_offset_ns)
            self.put("camera/depth/image_raw", msgs.image_from_array(_depth(i), "32FC1", dstamp, "cam"),
                     stamp_ns + depth_offset_ns + 4_000_000)

    def imu(self, stamp_ns: int, wz: float) -> None:
        msg = msgs.imu_msg(msgs.time_from_ns(stamp_ns), "imu_link", np.array([0, 0, 0, 1.0]), np.array([0, 0, wz]),
                           np.array([0, 0, 9.81]), np.eye(3).ravel() * 1e-3, np.eye(3).ravel() * 1e-4,
                           np.eye(3).ravel() * 1e-2)
        self.put("imu/data", msg, stamp_ns + 1_000_000)

    def gps(self, stamp_ns: int, lat: float) -> None:
        msg = msgs.navsat_msg(msgs.time_from_ns(stamp_ns), "gps", lat, 10.0, 100.0, 0, np.eye(3).ravel(), 2)
        self.put("gps/fix", msg, stamp_ns + 1_000_000)

    def joints(self, stamp_ns: int, left: float, right: float) -> None:
        msg = msgs.joint_state_msg(msgs.time_from_ns(stamp_ns), WHEEL_JOINTS, np.array([left, right]),
                                   np.array([1.0, 1.0]))
        self.put("joint_states", msg, stamp_ns + 1_000_000)

    def drive(self, start_ns: int, seconds: float, first_frame: int, camera_hz: float = 10.0, **camera_kw) -> int:
        """IMU 100 Hz, wheels 50 Hz, GPS 5 Hz, camera at camera_hz from start_ns; the next frame number."""
        frame = first_frame
        for k in range(int(seconds * 100)):
            t = start_ns + k * 10_000_000
            self.imu(t, wz=0.1 * k)
            if k % 2 == 0:
                self.joints(t, left=0.01 * k, right=0.02 * k)
            if k % 20 == 0:
                self.gps(t, lat=50.0 + 1e-6 * k)
            if k % int(100 / camera_hz) == 0:
                self.camera(frame, t, **camera_kw)
                frame += 1
        return frame

    def close(self):
        return self.rec.close()


def test_frames_come_back_exactly_with_interpolated_sensors(tmp_path):
    bag = _Bag(tmp_path / "bag")
    n = bag.drive(T0, 2.0, 0, depth_offset_ns=7_000_000)  # depth 7 ms after colour: inside the default slop
    bag.close()

    report = extract_bag(tmp_path / "bag", tmp_path / "ds")
    assert report.namespace == NS and report.run == 1
    assert report.frames_written == n == 20
    assert not report.malformed and not report.skipped
    dataset = open_dataset(tmp_path / "ds")
    assert len(dataset) == n
    segment = dataset.segments[0]
    for i in range(n):
        rgb, depth, record = load_frame(segment, i)
        np.testing.assert_array_equal(rgb, _rgb(i))  # colour pixels exact
        expected = decode_depth_mm(encode_depth_mm(_depth(i)))  # depth exact to the millimetre
        np.testing.assert_array_equal(np.isnan(depth), np.isnan(expected))
        np.testing.assert_array_equal(depth[~np.isnan(depth)], expected[~np.isnan(expected)])
        stamp = T0 + i * 100_000_000
        assert record.extras["stamp_ns"] == stamp
        assert record.timestamp == pytest.approx(stamp * 1e-9)
        assert record.extras["depth_offset_ms"] == pytest.approx(7.0)
        # IMU at 100 Hz: the frame falls on sample k = 10 i, angular z = 0.1 k
        assert record.imu.angular_velocity[2] == pytest.approx(0.1 * 10 * i)
        # wheels at 50 Hz, positions linear in time: exact interpolation
        assert record.encoders.left_position == pytest.approx(0.01 * 10 * i)
        assert record.encoders.right_position == pytest.approx(0.02 * 10 * i)
        assert record.gps is not None and record.gps.latitude == pytest.approx(50.0 + 1e-6 * (10 * i // 20 * 20))


def test_segments_cut_at_gaps_and_clock_resets_and_frame_limit(tmp_path):
    bag = _Bag(tmp_path / "bag")
    n = bag.drive(T0, 1.0, 0)
    n = bag.drive(T0 + 10 * 10**9, 1.0, n)  # a 9 s gap: new segment
    n = bag.drive(T0 - 500 * 10**9, 1.0, n)  # the clock goes back (sim reset): new segment
    bag.close()
    report = extract_bag(tmp_path / "bag", tmp_path / "ds", ExtractConfig(run=7))
    assert report.clock_resets >= 1
    assert list(report.segments) == ["a", "b", "c"]
    assert list(report.segments.values()) == [10, 10, 10]
    for name in "abc":
        seg = read_segment(tmp_path / "ds" / "Run-7" / name)
        stamps = [r.timestamp for r in seg.frames]
        assert stamps == sorted(stamps)

    report = extract_bag(tmp_path / "bag", tmp_path / "ds2", ExtractConfig(segment_frames=4, every=2))
    assert report.frames_synced == 30
    assert report.frames_written == 15
    assert list(report.segments.values()) == [4, 1, 4, 1, 4, 1]  # 5 per gap/reset block, 4 per segment


def test_frames_without_depth_bad_messages_and_bgr_cameras(tmp_path):
    bag = _Bag(tmp_path / "bag")
    t = T0
    for i in range(6):
        bag.imu(t - 5_000_000, 0.0)
        bag.camera(i, t, depth=(i % 2 == 0), encoding="bgr8")
        bag.imu(t + 5_000_000, 0.0)
        t += 100_000_000
    bad = msgs.joint_state_msg(msgs.time_from_ns(T0), ("other_joint",), np.array([0.0]), np.array([0.0]))
    bag.put("joint_states", bad, T0)
    bag.close()
    report = extract_bag(tmp_path / "bag", tmp_path / "ds", ExtractConfig(sync=ExtractConfig().sync))
    assert report.frames_written == 3
    assert report.skipped["no_depth"] == 3
    assert report.malformed["joints"] == 1
    assert any("other_joint" in e for e in report.errors)
    segment = open_dataset(tmp_path / "ds").segments[0]
    rgb, _, record = load_frame(segment, 1)
    np.testing.assert_array_equal(rgb, _rgb(2))  # bgr8 on the wire, RGB in the dataset
    assert record.gps is None and record.encoders is None  # no GPS or wheels in this bag: empty columns
    assert "\n".join(report.lines())


def test_bad_bags_and_outputs_are_refused_without_writing(tmp_path):
    with pytest.raises(BagError):
        extract_bag(tmp_path / "nothing", tmp_path / "ds")
    empty = tmp_path / "empty"
    BagRecorder(empty, min_free_bytes=0).close()
    with pytest.raises(BagError, match="empty"):
        extract_bag(empty, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()

    two = _Bag(tmp_path / "two", namespace="/rover_0")
    two.drive(T0, 0.3, 0)
    two.close()
    with pytest.raises(BagError, match="rover_9"):
        extract_bag(tmp_path / "two", tmp_path / "ds", ExtractConfig(namespace="rover_9"))
    extract_bag(tmp_path / "two", tmp_path / "ds", ExtractConfig(run=1))
    with pytest.raises(FileExistsError, match="Run-1"):
        extract_bag(tmp_path / "two", tmp_path / "ds", ExtractConfig(run=1))
    assert len(open_dataset(tmp_path / "ds")) == 3
    with pytest.raises(ValueError, match="every"):
        ExtractConfig(every=0).validate()


def test_find_namespaces():
    topics = ["/rover_0/camera/image_raw", "/rover_1/camera/image_raw", "/camera/image_raw", "/rover_0/imu/data"]
    assert find_namespaces(topics) == ["", "/rover_0", "/rover_1"]


def test_cli_extract_bag_info_and_repair(tmp_path, capsys):
    from forest_perception.dataset_tools.cli import main

    bag = _Bag(tmp_path / "bag")
    bag.drive(T0, 0.5, 0)
    bag.close()
    assert main(["bag-info", str(tmp_path / "bag")]) == 0
    assert "/rover_0/camera/image_raw" in capsys.readouterr().out
    assert main(["extract", str(tmp_path / "bag"), "--out", str(tmp_path / "ds"), "--quiet", "--every", "2"]) == 0
    out = capsys.readouterr().out
    assert "written: 3" in out and "Run-1" in out
    assert main(["repair", str(tmp_path / "bag")]) == 0  # nothing to repair: says so, changes nothing
    assert len(open_dataset(tmp_path / "ds")) == 3
    assert main(["extract", str(tmp_path / "missing"), "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert "forest-dataset extract:" in err and "missing" in err


def test_extract_leaves_scores_that_curate_uses_instead_of_decoding(tmp_path):
    from forest_perception.dataset_tools.curate import CurateConfig, curate
    from forest_perception.dataset_tools.scores import SCORES_FILE
    from forest_perception.dataset_tools.validate import validate_dataset

    bag = _Bag(tmp_path / "bag")
    bag.drive(T0, 2.0, 0)
    bag.close()
    extract_bag(tmp_path / "bag", tmp_path / "ds")
    assert (tmp_path / "ds" / "Run-1" / "a" / SCORES_FILE).is_file()
    assert validate_dataset(tmp_path / "ds").ok
    cached = curate(tmp_path / "ds", tmp_path / "cur1", CurateConfig(fraction=0.5, seed=1))
    assert cached.summary["scores_from_cache"] == 20
    # the same decisions as scoring the PNGs from scratch
    (tmp_path / "ds" / "Run-1" / "a" / SCORES_FILE).unlink()
    fresh = curate(tmp_path / "ds", tmp_path / "cur2", CurateConfig(fraction=0.5, seed=1))
    assert fresh.summary["scores_from_cache"] == 0
    assert cached.table.reason == fresh.table.reason
    np.testing.assert_allclose(cached.table.laplacian, fresh.table.laplacian, rtol=1e-9)
    np.testing.assert_allclose(cached.table.descriptors, fresh.table.descriptors, atol=1e-6)
    # a frame whose PNG changed after extraction is scored again, not taken from the cache
    extract_bag(tmp_path / "bag", tmp_path / "ds3")
    png = tmp_path / "ds3" / "Run-1" / "a" / "rgb_image" / "000003.png"
    import cv2

    cv2.imwrite(str(png), cv2.GaussianBlur(cv2.imread(str(png)), (9, 9), 3))
    again = curate(tmp_path / "ds3", tmp_path / "cur3", CurateConfig(fraction=0.5, seed=1))
    assert again.summary["scores_from_cache"] == 19
    assert (tmp_path / "cur3" / "Run-1" / "a" / SCORES_FILE).is_file()  # the output carries its scores on


def test_imu_starting_late_records_extract_curate_and_validate(tmp_path, capsys):
    """A fresh recording: camera frames before the first IMU message. The one rule (empty IMU cells) holds
    through extract, curate, split and validate."""
    from forest_perception.dataset_tools.cli import main
    from forest_perception.dataset_tools.metadata import IMU_COLUMNS

    bag = _Bag(tmp_path / "bag")
    imu_from = T0 + 600_000_000  # the IMU driver comes up 0.6 s after the camera
    for k in range(200):  # 2 s: camera 10 Hz, wheels 50 Hz, GPS 5 Hz from the start, IMU 100 Hz from 0.6 s
        t = T0 + k * 10_000_000
        if t >= imu_from:
            bag.imu(t, wz=0.1)
        if k % 2 == 0:
            bag.joints(t, left=0.01 * k, right=0.02 * k)
        if k % 20 == 0:
            bag.gps(t, lat=50.0 + 1e-5 * k)
        if k % 10 == 0:
            bag.camera(k // 10, t)
    bag.close()

    assert main(["extract", str(tmp_path / "bag"), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    out = capsys.readouterr().out
    segment = open_dataset(tmp_path / "ds").segments[0]
    assert len(segment) == 20
    without = [r for r in segment.frames if r.imu is None]
    # the frames well before the first IMU message have none (the sync may reach a little way back)
    assert 4 <= len(without) <= 6 and without == segment.frames[: len(without)]
    assert all("no_imu" in str(r.extras["sync_flags"]) for r in without)
    assert f"frames without an IMU reading (before the first IMU message; IMU cells left empty): {len(without)}" in out
    # in the file: six empty IMU cells, never "nan"
    text = (segment.path / "metadata.csv").read_text()
    assert "nan" not in text.lower()
    header = text.splitlines()[0].split(",")
    first = text.splitlines()[1].split(",")
    assert all(first[header.index(c)] == "" for c in IMU_COLUMNS)

    assert main(["validate", str(tmp_path / "ds"), "--quiet", "--workers", "1"]) == 0
    assert "OK: 0 error(s), 0 warning(s)" in capsys.readouterr().out
    assert main(["curate", str(tmp_path / "ds"), "--out", str(tmp_path / "cur"), "--quiet", "--workers", "1",
                 "--duplicate-distance", "0", "--blur-ratio", "0"]) == 0
    kept = open_dataset(tmp_path / "cur").segments[0]
    assert sum(r.imu is None for r in kept.frames) == len(without)  # kept, in the form the layout allows
    assert main(["validate", str(tmp_path / "cur"), "--quiet", "--workers", "1"]) == 0
    assert main(["split", str(tmp_path / "cur"), "--by", "gps", "--cell", "2", "--fractions", "0.5,0.5,0"]) == 0
    capsys.readouterr()


def test_a_rovers_bag_becomes_a_curated_rover_folder_with_held_out_segments(tmp_path):
    """The demo's and the adaptation experiment's path (bag -> extract -> curate), which the ClientApp then splits."""
    import hashlib

    from forest_perception.collab.rover.dataset import scan_recordings
    from forest_perception.collab.rover.holdout import rover_split
    from forest_perception.demo.swarm import bag_to_rover_folder

    bag = _Bag(tmp_path / "bag")
    n = bag.drive(T0, 4.0, 0)
    bag.close()
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "bag").iterdir()}

    frames, segments = bag_to_rover_folder(tmp_path / "bag", tmp_path / "work", tmp_path / "rover_0", segment_frames=10)
    assert n == 40 and 0 < frames <= n and segments == 4  # 10 frames a segment; curation may drop some
    assert not (tmp_path / "work" / "rover_0_extracted").exists()  # the intermediate extract is removed
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "bag").iterdir()} == digest
    scan = scan_recordings(tmp_path / "rover_0")
    assert not scan.errors and scan.frames == frames
    train, held_out = rover_split({s.segment_id: s.frames for s in scan.segments}, fraction=0.25)
    assert train and held_out and not set(train) & set(held_out)
    kept = scan.segments[0]
    rgb, depth, _ = load_frame(kept.segment, 0)
    assert rgb.shape == (H, W, 3) and depth.shape == (H, W)  # the frames are the bag's, paired

    # run again into the same folder: replaced, not appended to
    assert bag_to_rover_folder(tmp_path / "bag", tmp_path / "work", tmp_path / "rover_0", 10) == (frames, segments)
