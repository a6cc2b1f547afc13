"""BagRecorder: rosbag2 MCAP bags read back by readers we did not write (mcap, rosbags); splits, zstd, guards."""

from __future__ import annotations

import threading
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import yaml

from forest_perception.recorder import (
    BagRecorder,
    RecorderError,
    adapted_subscription_qos,
    qos_profile,
)

T0 = 1_750_000_000_000_000_000
IMAGE = "/rover_0/camera/image_raw"
IMU = "/rover_0/imu/data"
SENSOR_QOS = qos_profile(history="keep_last", depth=5, reliability="best_effort", durability="volatile")
RELIABLE_QOS = qos_profile(history="keep_last", depth=10, reliability="reliable", durability="volatile")
Usage = namedtuple("Usage", "total used free")


def _image_cdr(i: int, shape=(48, 64, 3)) -> bytes:
    from rclpy.serialization import serialize_message

    from forest_perception import msgs

    pixels = np.random.default_rng(i).integers(0, 256, size=shape, dtype=np.uint8)
    return serialize_message(msgs.image_from_array(pixels, "rgb8", msgs.time_from_ns(T0 + i), "cam"))


def _imu_cdr(i: int) -> bytes:
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import Imu

    msg = Imu()
    msg.header.frame_id = "imu_link"
    msg.linear_acceleration.z = 9.81 + i
    return serialize_message(msg)


def _mcap_messages(path: Path) -> list[tuple[str, int, bytes]]:
    """(topic, log time, raw data) of one file, read by the mcap library on its own."""
    from mcap.reader import make_reader

    with open(path, "rb") as f:
        reader = make_reader(f, validate_crcs=True)
        return [(c.topic, m.log_time, m.data) for _, c, m in reader.iter_messages(log_time_order=True)]


def _metadata(bag: Path) -> dict:
    return yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]


def test_written_bag_is_read_by_mcap_and_rosbags(tmp_path):
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory
    from rclpy.serialization import deserialize_message
    from rosbags.rosbag2 import Reader
    from sensor_msgs.msg import Image

    bag = tmp_path / "bag"
    sent = []
    with BagRecorder(bag, custom_data={"rover": "rover_0"}) as recorder:
        recorder.add_topic(IMAGE, "sensor_msgs/msg/Image", [SENSOR_QOS])
        recorder.add_topic(IMU, "sensor_msgs/msg/Imu", [RELIABLE_QOS, SENSOR_QOS])
        for i in range(30):
            for topic, data in ((IMAGE, _image_cdr(i)), (IMU, _imu_cdr(i))):
                t = T0 + i * 33_000_000 + (topic == IMU)
                assert recorder.write(topic, data, t, publish_time_ns=t - 1000)
                sent.append((topic, t, data))
    stats = recorder.stats
    assert stats.state == "closed" and stats.written == 60 and stats.dropped == 0
    assert stats.files == ("bag_0.mcap",) and stats.topics[IMAGE].bytes == sum(len(d) for t, _, d in sent
                                                                                if t == IMAGE)

    # the mcap library: profile, schemas with the full definition, channel metadata, rosbag2 record, data
    path = bag / "bag_0.mcap"
    with open(path, "rb") as f:
        reader = make_reader(f, validate_crcs=True, decoder_factories=[DecoderFactory()])
        assert reader.get_header().profile == "ros2"
        summary = reader.get_summary()
        schemas = {s.name: s for s in summary.schemas.values()}
        assert schemas["sensor_msgs/msg/Image"].encoding == "ros2msg"
        assert "MSG: std_msgs/Header" in schemas["sensor_msgs/msg/Image"].data.decode()
        channels = {c.topic: c for c in summary.channels.values()}
        assert channels[IMU].message_encoding == "cdr"
        assert channels[IMU].metadata["topic_type_hash"].startswith("RIHS01_")
        offered = yaml.safe_load(channels[IMU].metadata["offered_qos_profiles"])
        assert [p["reliability"] for p in offered] == ["reliable", "best_effort"]
        assert summary.statistics.message_count == 60
        records = list(reader.iter_metadata())
        assert [r.name for r in records] == ["rosbag2"]
        assert yaml.safe_load(records[0].metadata["serialized_metadata"])["message_count"] == 60
        decoded = list(reader.iter_decoded_messages())
    assert [(c.topic, m.log_time, m.data) for _, c, m, _ in decoded] == sent
    for (_, channel, message, ros_msg), (_, _, data) in zip(decoded, sent, strict=True):
        assert message.publish_time == message.log_time - 1000
        if channel.topic == IMAGE:
            original = deserialize_message(data, Image)
            assert (ros_msg.width, ros_msg.height, ros_msg.encoding) == (64, 48, "rgb8")
            assert bytes(ros_msg.data) == bytes(original.data)

    # rosbags: metadata.yaml, QoS profiles, counts, raw bytes identical
    with Reader(bag) as reader:
        assert reader.message_count == 60 and reader.duration == 29 * 33_000_000 + 1 + 1
        conns = {c.topic: c for c in reader.connections}
        assert conns[IMAGE].msgtype == "sensor_msgs/msg/Image" and conns[IMAGE].msgcount == 30
        assert [q.reliability.name for q in conns[IMU].ext.offered_qos_profiles] == ["RELIABLE", "BEST_EFFORT"]
        assert conns[IMU].ext.offered_qos_profiles[0].depth == 10
        got = [(c.topic, t, bytes(d)) for c, t, d in reader.messages()]
    assert got == sent
    meta = _metadata(bag)
    assert meta["version"] == 9 and meta["storage_identifier"] == "mcap" and meta["custom_data"] == {"rover": "rover_0"}
    assert meta["files"][0]["message_count"] == 60 and meta["relative_file_paths"] == ["bag_0.mcap"]


def test_split_by_size_gives_complete_files_each_readable_alone(tmp_path):
    from rosbags.rosbag2 import Reader

    bag = tmp_path / "sized"
    payload = _image_cdr(0, shape=(60, 80, 3))  # 14.4 kB
    with BagRecorder(bag, max_split_bytes=100_000, chunk_bytes=32_000) as recorder:
        recorder.add_topic(IMAGE, "sensor_msgs/msg/Image")
        for i in range(40):
            assert recorder.write(IMAGE, payload, T0 + i * 1_000_000)
    files = sorted(bag.glob("*.mcap"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    assert len(files) >= 5
    meta = _metadata(bag)
    assert meta["relative_file_paths"] == [f.name for f in files]
    times = []
    for f, entry in zip(files, meta["files"], strict=True):
        messages = _mcap_messages(f)  # each file on its own, with its own summary and footer
        assert len(messages) == entry["message_count"] > 0
        assert all(d == payload for _, _, d in messages)
        times += [t for _, t, _ in messages]
        assert f.stat().st_size < 100_000 + 32_000 + 15_000  # one chunk and one message past the limit at most
    assert times == [T0 + i * 1_000_000 for i in range(40)]
    with Reader(bag) as reader:
        assert reader.message_count == 40 and sum(1 for _ in reader.messages()) == 40


def test_split_by_duration_uses_message_log_times(tmp_path):
    bag = tmp_path / "timed"
    with BagRecorder(bag, max_split_duration_s=1.0) as recorder:
        recorder.add_topic(IMU, "sensor_msgs/msg/Imu")
        for i in range(50):  # 10 Hz for 5 s
            recorder.write(IMU, _imu_cdr(i), T0 + i * 100_000_000)
    meta = _metadata(bag)
    assert meta["relative_file_paths"] == [f"timed_{k}.mcap" for k in range(5)]
    for k, entry in enumerate(meta["files"]):
        times = [t for _, t, _ in _mcap_messages(bag / entry["path"])]
        assert len(times) == 10 and times[0] == T0 + k * 1_000_000_000
        assert times[-1] - times[0] < 1_000_000_000
        assert entry["duration"]["nanoseconds"] == times[-1] - times[0]


def test_zstd_chunks_are_smaller_and_read_back(tmp_path):
    from mcap.reader import make_reader
    from rosbags.rosbag2 import Reader

    from forest_perception import msgs

    flat = np.zeros((120, 160, 3), np.uint8)
    flat[:, :80] = 200  # compressible, like sky and ground
    from rclpy.serialization import serialize_message

    payload = serialize_message(msgs.image_from_array(flat, "rgb8", msgs.time_from_ns(T0), "cam"))
    sizes = {}
    for compression in ("none", "zstd"):
        bag = tmp_path / compression
        with BagRecorder(bag, compression=compression, chunk_bytes=200_000) as recorder:
            recorder.add_topic(IMAGE, "sensor_msgs/msg/Image")
            for i in range(20):
                recorder.write(IMAGE, payload, T0 + i)
        sizes[compression] = (bag / f"{compression}_0.mcap").stat().st_size
        with open(bag / f"{compression}_0.mcap", "rb") as f:
            chunks = make_reader(f).get_summary().chunk_indexes
        assert {c.compression for c in chunks} == ({"zstd"} if compression == "zstd" else {""})
        assert [d for _, _, d in _mcap_messages(bag / f"{compression}_0.mcap")] == [payload] * 20
        with Reader(bag) as reader:
            assert [bytes(d) for _, _, d in reader.messages()] == [payload] * 20
        assert _metadata(bag)["compression_mode"] == ""  # chunk compression is internal to MCAP
    assert sizes["zstd"] < sizes["none"] / 10


def test_pause_resume_split_and_an_empty_bag(tmp_path):
    from rosbags.rosbag2 import Reader

    bag = tmp_path / "ops"
    recorder = BagRecorder(bag)
    recorder.add_topic(IMU, "sensor_msgs/msg/Imu")
    assert recorder.split() is None  # nothing written yet: no empty file
    for i in range(5):
        assert recorder.write(IMU, _imu_cdr(i), T0 + i)
    recorder.pause()
    assert recorder.state == "paused"
    assert not recorder.write(IMU, _imu_cdr(99), T0 + 99)
    recorder.resume()
    assert recorder.split() == "ops_0.mcap"
    assert recorder.files == [bag / "ops_0.mcap"]
    assert _metadata(bag)["relative_file_paths"] == ["ops_0.mcap"]  # listed as soon as it is finished
    recorder.add_topic(IMAGE, "sensor_msgs/msg/Image")  # a topic that appears later
    for i in range(5, 8):
        recorder.write(IMU, _imu_cdr(i), T0 + i)
        recorder.write(IMAGE, _image_cdr(i), T0 + i)
    stats = recorder.close()
    assert stats.topics[IMU].received == 8 and stats.topics[IMU].written == 8  # the paused one is not counted
    assert stats.files == ("ops_0.mcap", "ops_1.mcap")
    with pytest.raises(RecorderError, match="closed"):
        recorder.split()
    assert not recorder.write(IMU, _imu_cdr(0), T0)
    with Reader(bag) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        assert counts == {IMU: 8, IMAGE: 3}
        assert T0 + 99 not in [t for _, t, _ in reader.messages()]
    assert [t for t, _, _ in _mcap_messages(bag / "ops_0.mcap")] == [IMU] * 5

    empty = tmp_path / "empty"
    with BagRecorder(empty) as recorder:
        recorder.add_topic(IMU, "sensor_msgs/msg/Imu")
    with Reader(empty) as reader:  # a complete bag with no messages, as rosbag2 leaves one
        assert reader.message_count == 0 and [c.topic for c in reader.connections] == [IMU]
    assert _mcap_messages(empty / "empty_0.mcap") == []


def test_disk_guard_closes_the_bag_cleanly_and_stops(tmp_path):
    from rosbags.rosbag2 import Reader

    bag = tmp_path / "full"
    budget = 3_000_000

    def disk_usage(_path: str) -> Usage:  # a small disk: what the bag writes fills it
        used = sum(p.stat().st_size for p in bag.glob("*")) if bag.exists() else 0
        return Usage(budget, used, budget - used)

    payload = _image_cdr(1, shape=(100, 100, 3))  # 30 kB
    recorder = BagRecorder(bag, min_free_bytes=1_000_000, max_split_bytes=500_000, chunk_bytes=64_000,
                           disk_usage=disk_usage, disk_check_interval_s=0.01)
    recorder.add_topic(IMAGE, "sensor_msgs/msg/Image")
    accepted = 0
    deadline = time.monotonic() + 20.0
    while recorder.state == "recording" and time.monotonic() < deadline:
        accepted += recorder.write(IMAGE, payload, T0 + accepted)
        time.sleep(0.002)
    assert recorder.state == "stopped"
    assert "below the minimum of 1 MB" in recorder.stop_reason
    assert not recorder.write(IMAGE, payload, T0)  # stopped: nothing more is taken
    stats = recorder.close()
    assert stats.state == "closed" and "below the minimum" in stats.stop_reason
    assert stats.written + stats.dropped == accepted
    assert stats.written > 0
    assert disk_usage("").free < 1_500_000  # it stopped near the limit, not long before
    with Reader(bag) as reader:  # every file complete and listed
        assert reader.message_count == stats.written
        assert sum(1 for _ in reader.messages()) == stats.written
    assert sorted(p.name for p in bag.glob("*.mcap")) == sorted(_metadata(bag)["relative_file_paths"])
    for f in bag.glob("*.mcap"):
        assert _mcap_messages(f)


def test_full_queue_drops_and_counts_without_blocking(tmp_path):
    bag = tmp_path / "queue"
    gate, entered = threading.Event(), threading.Event()
    calls = []

    def disk_usage(_path: str) -> Usage:
        calls.append(1)
        if len(calls) == 2:  # the writer thread opening the first split: hold it there
            entered.set()
            gate.wait(10.0)
        return Usage(1 << 40, 0, 1 << 40)

    payload = _imu_cdr(0)
    recorder = BagRecorder(bag, queue_max_bytes=3 * len(payload), disk_usage=disk_usage, disk_check_interval_s=60.0)
    recorder.add_topic(IMU, "sensor_msgs/msg/Imu")
    assert recorder.write(IMU, payload, T0)
    assert entered.wait(5.0)
    t0 = time.perf_counter()
    accepted = [recorder.write(IMU, payload, T0 + i) for i in range(1, 11)]
    elapsed = time.perf_counter() - t0
    assert accepted == [True] * 3 + [False] * 7
    assert elapsed < 0.5  # the writer is stuck, the caller is not
    stats = recorder.stats
    assert stats.topics[IMU].dropped == 7 and stats.topics[IMU].received == 11
    assert stats.queue_bytes == 3 * len(payload) == stats.queue_peak_bytes
    gate.set()
    stats = recorder.close()
    assert stats.written == 4 and stats.dropped == 7
    assert [t for _, t, _ in _mcap_messages(bag / "queue_0.mcap")] == [T0, T0 + 1, T0 + 2, T0 + 3]


def test_bad_arguments_are_refused_with_reasons(tmp_path):
    with pytest.raises(ValueError, match="compression"):
        BagRecorder(tmp_path / "a", compression="lz5")
    with pytest.raises(ValueError, match="max_split_bytes"):
        BagRecorder(tmp_path / "a", max_split_bytes=-1)
    with pytest.raises(ValueError, match="queue_max_bytes"):
        BagRecorder(tmp_path / "a", queue_max_bytes=0)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep me")
    with pytest.raises(RecorderError, match="not overwriting"):
        BagRecorder(tmp_path / "used")
    assert (tmp_path / "used" / "x").read_text() == "keep me"
    with pytest.raises(RecorderError, match="free disk space"):
        BagRecorder(tmp_path / "b", min_free_bytes=10**6, disk_usage=lambda _p: Usage(10**6, 10**6 - 5, 5))
    assert not (tmp_path / "b").exists()

    with BagRecorder(tmp_path / "c") as recorder:
        with pytest.raises(ValueError, match="absolute"):
            recorder.add_topic("imu/data", "sensor_msgs/msg/Imu")
        with pytest.raises(ValueError, match="sensor_msgs/msg/Image"):
            recorder.add_topic("/imu", "sensor_msgs/Imu")
        with pytest.raises(ValueError, match="not in the rosbags"):
            recorder.add_topic("/x", "my_msgs/msg/Unknown")
        with pytest.raises(ValueError, match="reliability"):
            recorder.add_topic("/imu", "sensor_msgs/msg/Imu", [{"reliability": "sometimes"}])
        with pytest.raises(KeyError, match="add_topic"):
            recorder.write("/never_added", b"\x00\x01\x00\x00", T0)
        spec = recorder.add_topic("/x", "my_msgs/msg/Custom", msgdef="int32 value\n", type_hash="RIHS01_" + "0" * 64)
        recorder.add_topic("/imu", "sensor_msgs/msg/Imu")
        with pytest.raises(ValueError, match="already recorded"):
            recorder.add_topic("/imu", "sensor_msgs/msg/Image")
        assert recorder.write("/x", b"\x00\x01\x00\x00\x2a\x00\x00\x00", T0)
    assert spec.msgdef == "int32 value\n"
    assert [(t, d) for t, _, d in _mcap_messages(tmp_path / "c" / "c_0.mcap")] == [
        ("/x", b"\x00\x01\x00\x00\x2a\x00\x00\x00")
    ]


def test_subscription_qos_is_adapted_to_the_publishers():
    best_effort = qos_profile(reliability="best_effort")
    latched = qos_profile(reliability="reliable", durability="transient_local")
    assert adapted_subscription_qos([RELIABLE_QOS]) == ("reliable", "volatile")
    assert adapted_subscription_qos([RELIABLE_QOS, best_effort]) == ("best_effort", "volatile")
    assert adapted_subscription_qos([latched, latched]) == ("reliable", "transient_local")
    assert adapted_subscription_qos([latched, RELIABLE_QOS]) == ("reliable", "volatile")
    assert adapted_subscription_qos([]) == ("best_effort", "volatile")
    infinite = qos_profile(deadline_ns=2**63 - 1)
    assert infinite["deadline"] == {"sec": 9223372036, "nsec": 854775807}  # RMW_DURATION_INFINITE
    with pytest.raises(ValueError, match="depth"):
        qos_profile(depth=-1)
