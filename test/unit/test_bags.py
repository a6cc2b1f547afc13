"""dataset_tools.bags: reading, clear errors on bad bags, and repair after a recorder killed with SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forest_perception.dataset_tools.bag_repair import repair_bag
from forest_perception.dataset_tools.bags import BagError, bag_info, read_bag
from forest_perception.dataset_tools.mcap_files import check_mcap
from forest_perception.recorder import BagRecorder, qos_profile

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_750_000_000_000_000_000
TOPIC = "/rover_0/counter"
MESSAGE_BYTES = 4_000


def _text(i: int) -> str:
    """The payload of message i: its number repeated, so any damage shows."""
    return f"{i:08d}" * (MESSAGE_BYTES // 8)


def _string_cdr(i: int) -> bytes:
    from forest_perception.recorder import typestore

    store = typestore()
    return store.serialize_cdr(store.types["std_msgs/msg/String"](data=_text(i)), "std_msgs/msg/String")


def _mcap_count(path: Path) -> int:
    from mcap.reader import make_reader

    with open(path, "rb") as f:
        return sum(1 for _ in make_reader(f, validate_crcs=True).iter_messages())


def _write_bag(path: Path, n: int, **kwargs) -> Path:
    with BagRecorder(path, **kwargs) as recorder:
        recorder.add_topic(TOPIC, "std_msgs/msg/String", [qos_profile(reliability="reliable", depth=10)])
        for i in range(n):
            recorder.write(TOPIC, _string_cdr(i), T0 + i * 1_000_000)
    return path


# The recorder in a separate process, recording numbered messages until it is killed. It reports the
# messages written (handed to the MCAP writer) and the splits finished, one line at a time.
RECORDER_SCRIPT = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from forest_perception.recorder import BagRecorder, typestore
store = typestore()
String = store.types["std_msgs/msg/String"]
recorder = BagRecorder(sys.argv[1], max_split_bytes=300_000, chunk_bytes=16_000, flush_interval_s=0.2,
                       min_free_bytes=0)
recorder.add_topic("/rover_0/counter", "std_msgs/msg/String")
i = 0
last = 0.0
while True:
    data = store.serialize_cdr(String(data=f"{i:08d}" * 500), "std_msgs/msg/String")
    recorder.write("/rover_0/counter", data, 1_750_000_000_000_000_000 + i * 1_000_000)
    i += 1
    time.sleep(0.004)  # ~200 messages (800 kB) a second: a split every ~0.4 s
    now = time.monotonic()
    if now - last > 0.01:
        stats = recorder.stats
        print(stats.written, len(stats.files), flush=True)
        last = now
"""


def test_sigkill_mid_split_keeps_finished_splits_and_repair_recovers_the_rest(tmp_path):
    from rosbags.rosbag2 import Reader

    bag = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", RECORDER_SCRIPT, str(bag), str(ROOT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    written_at_kill = 0
    try:
        deadline = time.monotonic() + 60.0
        finished_at = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            written, finished = (int(v) for v in line.split())
            if finished >= 2 and finished_at is None:
                finished_at = written
            # well into the third split (300 kB = ~74 messages per file), far from its end
            if finished_at is not None and written >= finished_at + 20 and finished == 2:
                written_at_kill = written
                break
            if finished > 2:
                finished_at = None  # passed the point: aim at the middle of the next split
                if finished >= 6:
                    break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10.0)
        proc.stdout.close()
        stderr = proc.stderr.read()
        proc.stderr.close()
    assert written_at_kill, f"the recorder never got into a third split; stderr: {stderr[-2000:]}"

    # finished splits are complete and listed; the one cut short is neither. On a loaded machine the
    # progress lines lag behind the writer, so the split being written at the kill may be a later one
    files = sorted(bag.glob("killed_*.mcap"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    listed = meta["relative_file_paths"]
    assert len(files) >= 3 and listed == [f.name for f in files[:-1]]
    for name, entry in zip(listed, meta["files"], strict=True):
        assert check_mcap(bag / name).complete
        assert _mcap_count(bag / name) == entry["message_count"] > 0
    partial = files[-1]
    check = check_mcap(partial)
    assert not check.complete and "no footer" in check.problem
    with Reader(bag) as reader:  # the bag as left is readable: the finished splits
        assert sum(1 for _ in reader.messages()) == meta["message_count"]
    info = bag_info(bag)
    assert not info.ok and any(partial.name in p and "repair" in p for p in info.problems)

    report = repair_bag(bag)
    actions = {f.name: f.action for f in report.files}
    assert actions == {**{name: "ok" for name in listed}, partial.name: "recovered"}
    assert report.metadata_rebuilt and (bag / f"{partial.name}.damaged").stat().st_size == check.size
    assert f"{partial.name}: recovered" in report.summary()
    recovered = [m.message.data for m in read_bag(bag)]
    # every recovered message intact, in order, with no gap; at most one chunk (16 kB = 4 messages) lost
    assert recovered == [_text(i) for i in range(len(recovered))]
    assert len(recovered) >= written_at_kill - 5
    assert report.message_count == len(recovered)
    with Reader(bag) as reader:  # metadata rebuilt: read by rosbags
        assert reader.message_count == len(recovered)
        assert [c.msgcount for c in reader.connections] == [len(recovered)]
        assert sum(1 for _ in reader.messages()) == len(recovered)
    assert bag_info(bag).ok
    again = repair_bag(bag)  # idempotent: nothing left to do
    assert not again.changed and not again.metadata_rebuilt


@pytest.fixture(params=["none", "zstd"])
def healthy_bag(request, tmp_path) -> Path:
    """60 messages in chunks of ~3 messages, one file; chunks uncompressed or zstd."""
    return _write_bag(tmp_path / "good", 60, chunk_bytes=10_000, compression=request.param)


def _copy(bag: Path, tmp_path: Path, name: str) -> tuple[Path, Path]:
    target = tmp_path / name
    shutil.copytree(bag, target)
    return target, target / "good_0.mcap"


def test_truncated_file_gives_a_clear_error_and_repair_recovers_it(healthy_bag, tmp_path):
    bag, mcap = _copy(healthy_bag, tmp_path, "truncated")
    size = mcap.stat().st_size
    os.truncate(mcap, size // 2)
    with pytest.raises(BagError, match=rf"good_0\.mcap is truncated at byte {size // 2}.*repair"):
        read_bag(bag)
    assert any("truncated" in p for p in bag_info(bag).problems)
    report = repair_bag(bag)
    assert report.files[0].action == "recovered" and 20 < report.message_count < 60
    texts = [m.message.data for m in read_bag(bag)]
    assert texts == [_text(i) for i in range(report.message_count)]


def test_corrupt_chunk_is_reported_with_its_offset_and_skipped_by_repair(healthy_bag, tmp_path):
    from mcap.reader import make_reader

    bag, mcap = _copy(healthy_bag, tmp_path, "corrupt")
    with open(mcap, "rb") as f:
        chunks = sorted(make_reader(f).get_summary().chunk_indexes, key=lambda c: c.chunk_start_offset)
    bad = chunks[3]
    raw = bytearray(mcap.read_bytes())
    middle = bad.chunk_start_offset + bad.chunk_length // 2
    raw[middle : middle + 16] = b"\xff" * 16
    mcap.write_bytes(bytes(raw))

    messages = read_bag(bag)  # structure is fine: the damage shows when the reader gets there
    good = []
    with pytest.raises(BagError, match=rf"good_0\.mcap is corrupt at byte {bad.chunk_start_offset}"):
        for m in messages:
            good.append(m.message.data)
    assert good and good == [_text(i) for i in range(len(good))]  # what came before is intact, nothing after
    with open(healthy_bag / "good_0.mcap", "rb") as f:
        times = [m.log_time for _, _, m in make_reader(f).iter_messages()]
    per_chunk = [sum(c.message_start_time <= t <= c.message_end_time for t in times) for c in chunks]
    assert sum(per_chunk) == 60
    assert len(good) == sum(per_chunk[:3])

    report = repair_bag(bag)
    assert report.files[0].action == "recovered" and report.files[0].bad_chunks == 1
    texts = [m.message.data for m in read_bag(bag)]
    lost = set(range(sum(per_chunk[:3]), sum(per_chunk[:4])))
    assert texts == [_text(i) for i in range(60) if i not in lost]


def test_empty_and_non_bags_give_clear_errors(tmp_path):
    with pytest.raises(BagError, match="does not exist"):
        read_bag(tmp_path / "nothing")
    (tmp_path / "empty_dir").mkdir()
    for call in (read_bag, bag_info, repair_bag):
        with pytest.raises(BagError, match="not a bag directory: no metadata.yaml and no .mcap"):
            call(tmp_path / "empty_dir")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(BagError, match="notes.txt is not a bag"):
        read_bag(notes)
    with pytest.raises(BagError, match="notes.txt is not a bag: give a bag directory or an .mcap file"):
        repair_bag(notes)

    zero = _write_bag(tmp_path / "zero", 5)
    (zero / "zero_0.mcap").write_bytes(b"")
    with pytest.raises(BagError, match=r"zero_0\.mcap is empty \(0 bytes\)"):
        read_bag(zero)
    report = repair_bag(zero)  # nothing to recover: set aside, never deleted
    assert report.files[0].action == "unrecoverable" and (zero / "zero_0.mcap.damaged").exists()

    garbage = _write_bag(tmp_path / "garbage", 5)
    (garbage / "garbage_0.mcap").write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(BagError, match=r"garbage_0\.mcap is not an MCAP file"):
        read_bag(garbage)

    no_messages = _write_bag(tmp_path / "silent", 0)
    with pytest.raises(BagError, match="empty bag: it holds no messages"):
        read_bag(no_messages)
    info = bag_info(no_messages)
    assert info.ok and info.message_count == 0 and [t.name for t in info.topics] == [TOPIC]

    broken_yaml = _write_bag(tmp_path / "yaml", 5)
    (broken_yaml / "metadata.yaml").write_text("rosbag2_bagfile_information: [unclosed")
    with pytest.raises(BagError, match="metadata.yaml is unreadable: not valid YAML .*line 1.*forest-dataset repair"):
        read_bag(broken_yaml)
    (broken_yaml / "metadata.yaml").write_text("rosbag2_bagfile_information:\n  version: 9\n")
    with pytest.raises(BagError, match="lacks the field 'storage_identifier'"):
        read_bag(broken_yaml)
    assert repair_bag(broken_yaml).metadata_rebuilt  # rebuilt from the file; the broken one kept as .bak
    assert "version: 9" in (broken_yaml / "metadata.yaml.bak").read_text()
    assert len(list(read_bag(broken_yaml))) == 5


def test_repair_rebuilds_missing_metadata_with_the_recorded_qos(healthy_bag, tmp_path):
    from rosbags.rosbag2 import Reader

    bag, _ = _copy(healthy_bag, tmp_path, "nometa")
    original = (bag / "metadata.yaml").read_text()
    (bag / "metadata.yaml").unlink()
    with pytest.raises(BagError, match="no metadata.yaml.*forest-dataset repair"):
        read_bag(bag)
    assert "no metadata.yaml" in " ".join(bag_info(bag).problems)
    report = repair_bag(bag)
    assert report.metadata_rebuilt and not report.changed and report.message_count == 60
    rebuilt = yaml.safe_load((bag / "metadata.yaml").read_text())
    assert rebuilt == yaml.safe_load(original)  # the same as the recorder wrote
    with Reader(bag) as reader:
        conn = reader.connections[0]
        assert conn.ext.offered_qos_profiles[0].reliability.name == "RELIABLE"
        assert conn.ext.offered_qos_profiles[0].depth == 10
        assert sum(1 for _ in reader.messages()) == 60


def test_reads_bags_written_by_rosbags(tmp_path):
    """Bags from a writer we did not write (rosbags, MCAP and sqlite3 storage) read the same."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from forest_perception.recorder import typestore

    store = typestore()
    Vector3 = store.types["geometry_msgs/msg/Vector3"]
    for plugin in (StoragePlugin.MCAP, StoragePlugin.SQLITE3):
        path = tmp_path / plugin.name.lower()
        written = []
        with Writer(path, version=9, storage_plugin=plugin) as writer:
            conn = writer.add_connection("/imu/data", "sensor_msgs/msg/Imu", typestore=store)
            for i in range(7):
                msg = store.deserialize_cdr(_imu_bytes(i), "sensor_msgs/msg/Imu")
                assert isinstance(msg.linear_acceleration, Vector3)
                written.append(bytes(store.serialize_cdr(msg, "sensor_msgs/msg/Imu")))
                writer.write(conn, T0 + i, written[-1])
        got = list(read_bag(path))
        assert [(m.topic, m.msgtype, m.log_time_ns) for m in got] == [
            ("/imu/data", "sensor_msgs/msg/Imu", T0 + i) for i in range(7)
        ]
        assert [m.message.linear_acceleration.z for m in got] == [9.81 + i for i in range(7)]
        raw = list(read_bag(path, raw=True))
        assert [m.message for m in raw] == written
        info = bag_info(path)
        assert info.message_count == 7 and info.topics[0].type == "sensor_msgs/msg/Imu"
        assert "Messages:          7" in info.summary()
    report = repair_bag(tmp_path / "mcap")
    assert [f.action for f in report.files] == ["ok"]
    with pytest.raises(BagError, match="not MCAP"):
        repair_bag(tmp_path / "sqlite3")


def _imu_bytes(i: int) -> bytes:
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import Imu

    msg = Imu()
    msg.header.frame_id = "imu_link"
    msg.linear_acceleration.z = 9.81 + i
    return serialize_message(msg)


def test_a_truncated_single_mcap_is_named_as_such_and_repaired_in_place(healthy_bag, tmp_path, capsys):
    from forest_perception.dataset_tools.cli import main
    from forest_perception.dataset_tools.extract import extract_bag

    single = tmp_path / "drive.mcap"
    data = (healthy_bag / "good_0.mcap").read_bytes()
    single.write_bytes(data[: len(data) // 2])
    # not "no camera topic; topics in the bag: []": the file is damaged, and repair is the way out
    with pytest.raises(BagError, match=r"drive\.mcap is truncated at byte \d+.*nothing was extracted.*"
                                       r"forest-dataset repair .*drive\.mcap"):
        extract_bag(single, tmp_path / "ds")
    with pytest.raises(BagError, match=r"drive\.mcap is truncated.*forest-dataset repair"):
        read_bag(single)
    assert not (tmp_path / "ds").exists()
    assert main(["repair", str(single)]) == 0
    assert "drive.mcap: recovered" in capsys.readouterr().out
    assert (tmp_path / "drive.mcap.damaged").read_bytes() == data[: len(data) // 2]  # the original, kept
    texts = [m.message.data for m in read_bag(single)]
    assert 20 < len(texts) < 60 and texts == [_text(i) for i in range(len(texts))]


def test_repair_says_an_existing_metadata_yaml_is_unreadable_and_keeps_every_backup(healthy_bag, tmp_path):
    bag, _ = _copy(healthy_bag, tmp_path, "garbage")
    (bag / "metadata.yaml.bak").write_text("an earlier backup\n")
    garbage = bytes(range(200, 256)) * 3  # not even text
    (bag / "metadata.yaml").write_bytes(garbage)
    with pytest.raises(BagError, match="metadata.yaml is unreadable: not a text file.*forest-dataset repair"):
        bag_info(bag)
    report = repair_bag(bag)
    summary = report.summary()
    assert "the old metadata.yaml was unreadable (not a text file" in summary and "no metadata.yaml" not in summary
    assert "old one kept as metadata.yaml.bak.1" in summary
    assert (bag / "metadata.yaml.bak").read_text() == "an earlier backup\n"  # never overwritten
    assert (bag / "metadata.yaml.bak.1").read_bytes() == garbage
    assert bag_info(bag).ok and len(list(read_bag(bag))) == 60

    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "metadata.yaml").write_text("rosbag2_bagfile_information: {files: 3\n")
    with pytest.raises(BagError, match=r"lone/metadata\.yaml is unreadable: not valid YAML .*no \.mcap files.*"
                                       r"nothing was changed"):
        repair_bag(lone)
    assert sorted(p.name for p in lone.iterdir()) == ["metadata.yaml"]
