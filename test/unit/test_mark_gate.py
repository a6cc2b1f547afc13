"""Marked recording core (forest_perception.recorder.gate): what a mark writes, in what order, and what it costs."""

from __future__ import annotations

import struct

import pytest

from forest_perception.recorder.gate import GateConfig, MarkGate, covered_bytes, header_stamp_ns

MS = 1_000_000
IMAGE, DEPTH, IMU = "/r/camera/image_raw", "/r/camera/depth/image_raw", "/r/imu/data"


def cdr(stamp_ns: int, payload: bytes = b"x" * 20, big_endian: bool = False) -> bytes:
    """A serialized message starting with a std_msgs/Header stamp."""
    head = b"\x00\x00\x00\x00" if big_endian else b"\x00\x01\x00\x00"
    fmt = ">iI" if big_endian else "<iI"
    return head + struct.pack(fmt, stamp_ns // 1_000_000_000, stamp_ns % 1_000_000_000) + payload


def test_header_stamp_is_read_from_cdr():
    assert header_stamp_ns(cdr(12_345_678_901)) == 12_345_678_901
    assert header_stamp_ns(cdr(7 * MS, big_endian=True)) == 7 * MS
    assert header_stamp_ns(b"\x00\x01\x00\x00") is None  # too short
    assert header_stamp_ns(b"\x00\x03" + b"\x00" * 20) is None  # parameter-list CDR: not read


def config(**kw) -> GateConfig:
    return GateConfig(**{"frame_topics": frozenset({IMAGE, DEPTH}), "tolerance_ns": MS, "context_ns": 100 * MS,
                         "delay_ns": 500 * MS, **kw})


def drive(gate: MarkGate, seconds: float, marks_at: dict[int, int]) -> list:
    """Camera at 10 Hz (image + depth), IMU at 100 Hz, received 20 ms after their stamp; ``marks_at``:
    receive time (ms) -> marked frame stamp (ms). Returns what was written, in order."""
    written = []
    for t in range(0, int(seconds * 1000) + 1, 10):
        receive = (t + 20) * MS
        if t % 100 == 0:
            written += gate.push(IMAGE, cdr(t * MS), receive)
            written += gate.push(DEPTH, cdr(t * MS), receive)
        written += gate.push(IMU, cdr(t * MS), receive)
        if t in marks_at:
            gate.mark(marks_at[t] * MS)
        written += gate.release(receive)
    return written + gate.flush()


def test_a_mark_writes_its_frame_and_the_context_around_it_in_arrival_order():
    gate = MarkGate(config())
    # frame 1000 ms is marked 150 ms after it was taken (the trigger's decision time), frame 2000 ms at once
    written = drive(gate, 3.0, {1150: 1000, 2000: 2000})
    frames = [(h.topic, h.stamp_ns // MS) for h in written if h.topic != IMU]
    assert frames == [(IMAGE, 1000), (DEPTH, 1000), (IMAGE, 2000), (DEPTH, 2000)]
    imu = [h.stamp_ns // MS for h in written if h.topic == IMU]
    assert imu == list(range(900, 1101, 10)) + list(range(1900, 2101, 10))  # +-100 ms of context
    assert [h.receive_ns for h in written] == sorted(h.receive_ns for h in written)
    s = gate.stats
    assert s.marks == 2 and s.frames_written == 4 and s.written == len(written) and s.late_marks == 0
    assert s.written + s.discarded == 31 * 2 + 301 and gate.waiting_bytes == 0


def test_a_mark_after_the_frame_left_is_late_and_duplicates_count_once():
    gate = MarkGate(config())
    written = drive(gate, 2.0, {1900: 1000, 1950: 1000})  # 900 ms later: the frame waited only 500 ms
    assert not [h for h in written if h.topic == IMAGE]
    assert gate.stats.late_marks == 1 and gate.stats.duplicate_marks == 1 and gate.stats.marks == 1


def test_memory_bound_decides_the_oldest_early():
    gate = MarkGate(config(max_bytes=2_000))
    drive(gate, 1.0, {})
    assert gate.stats.decided_early > 0 and gate.stats.written == 0


def test_newest_frame_stamp_and_covered_bytes():
    gate = MarkGate(config())
    assert gate.newest_frame_stamp is None
    gate.push(IMAGE, cdr(5 * MS), 6 * MS)
    gate.push(IMU, cdr(7 * MS), 8 * MS)
    assert gate.newest_frame_stamp == 5 * MS
    messages = [(IMAGE, cdr(0)), (IMAGE, cdr(100 * MS)), (IMU, cdr(150 * MS)), (IMU, cdr(300 * MS))]
    assert covered_bytes(messages, [100 * MS], config()) == (2 * 32, 2)


@pytest.mark.parametrize("field, value", [("delay_ns", -1), ("max_bytes", 0)])
def test_config_is_validated(field, value):
    with pytest.raises(ValueError, match=field):
        MarkGate(config(**{field: value}))


def _replay_marked(full, out, custom_data: dict) -> MarkGate:
    """``full`` through the gate into ``out`` as capture_node's marked mode writes it; a mark every 6th frame."""
    from test_extract import NS, TYPES  # the extract tests' bag builder (test/unit is on sys.path)

    from forest_perception.dataset_tools.bags import read_bag
    from forest_perception.recorder import BagRecorder

    frame_topics = frozenset(f"{NS}/{t}" for t in ("camera/image_raw", "camera/camera_info", "camera/depth/image_raw"))
    gate = MarkGate(GateConfig(frame_topics=frame_topics))  # capture_node's defaults: +-0.5 s, 2 s wait
    marked = BagRecorder(out, min_free_bytes=0, custom_data=custom_data)
    for rel, type_name in TYPES.items():
        marked.add_topic(f"{NS}/{rel}", type_name)
    # the camera arrives 300 ms after the IMU of the same instant (as the simulator's render workers deliver it)
    arrivals = sorted((m.log_time_ns + (300 * MS if m.topic in frame_topics else 0), m.topic, bytes(m.message))
                      for m in read_bag(full, raw=True))
    frames = 0
    for log_ns, topic, data in arrivals:
        held = gate.push(topic, data, log_ns)
        if topic == f"{NS}/camera/image_raw":
            if frames % 6 == 0:  # every 1.8 s
                gate.mark(header_stamp_ns(data))
            frames += 1
        for h in held + gate.release(log_ns):
            marked.write(h.topic, h.data, h.receive_ns, h.publish_ns, h.sequence)
    for h in gate.flush():
        marked.write(h.topic, h.data, h.receive_ns, h.publish_ns, h.sequence)
    marked.close()
    return gate


def test_a_marked_bag_extracts_every_marked_frame_with_its_sensors(tmp_path):
    """Extract finds each marked frame, with IMU and wheels, although every stream is silent between them."""
    from test_extract import _Bag

    from forest_perception.dataset_tools.extract import ExtractConfig, extract_bag, recorded_mode

    full = _Bag(tmp_path / "full")
    full.drive(1_000_000_000_000, 12.0, 0, camera_hz=3.4)  # a frame every 0.3 s
    full.close()
    gate = _replay_marked(tmp_path / "full", tmp_path / "marked", {"record_mode": "marked"})
    assert recorded_mode(tmp_path / "marked") == "marked" and recorded_mode(tmp_path / "full") == "all"
    assert gate.stats.marks == 7 and gate.stats.frames_written == 7 * 3
    report = extract_bag(tmp_path / "marked", tmp_path / "ds", ExtractConfig(run=1))
    assert report.frames_written == 7 and not report.skipped and report.frames_without_imu == 0
    # the same bag not known to be marked: the streams silent between frame sets count as missing sensors and
    # most frames lose their depth (what extract did before it read record_mode)
    _replay_marked(tmp_path / "full", tmp_path / "unlabelled", {})
    plain = extract_bag(tmp_path / "unlabelled", tmp_path / "ds2", ExtractConfig(run=1))
    assert plain.frames_written < 7
