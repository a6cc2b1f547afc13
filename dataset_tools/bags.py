"""Read and inspect rosbag2 bags without ROS (rosbags and mcap; no rclpy); ``bag_repair`` mends MCAP bags.

``read_bag`` yields the messages of a bag directory (MCAP or sqlite3) or one ``.mcap`` file as rosbags
dataclasses; ``bag_info`` summarises a bag like ``ros2 bag info`` and lists what is wrong with it. A bag
that cannot be read raises ``BagError`` naming the file, the byte offset and what was wrong, before any
message of a bad file is yielded. docs/dataset_tools.md ("Bags") has the details.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from mcap.records import Channel, Schema

from forest_perception.dataset_tools.mcap_files import BagError, check_mcap, iter_mcap_messages, read_summary
from forest_perception.dataset_tools.settings import yaml_problem
from forest_perception.recorder import TopicSpec

__all__ = ["BagError", "BagFileInfo", "BagInfo", "BagMessage", "BagTopicInfo", "bag_info", "read_bag"]


class BagMessage(NamedTuple):
    """One message read from a bag."""

    topic: str
    msgtype: str
    log_time_ns: int
    message: Any  # rosbags dataclass, or the raw CDR bytes with read_bag(raw=True)


# ------------------------------------------------------------------------------------- metadata
def split_order(path: Path) -> tuple[int, str]:
    """Sort key of a bag's MCAP files: split number (``<name>_<N>.mcap``), then name."""
    match = re.search(r"_(\d+)\.mcap$", path.name)
    return (int(match.group(1)) if match else 1 << 30, path.name)


def load_bag_metadata(bag: Path) -> dict[str, Any]:
    """The ``rosbag2_bagfile_information`` of ``bag/metadata.yaml``; ``BagError`` saying what is wrong with it."""
    meta_path = bag / "metadata.yaml"
    try:
        document = yaml.safe_load(meta_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BagError(f"{meta_path} is unreadable: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BagError(f"{meta_path} is unreadable: not a text file (byte {exc.start} is not UTF-8)") from None
    except yaml.YAMLError as exc:
        raise BagError(f"{meta_path} is unreadable: not valid YAML ({yaml_problem(exc)})") from None
    info = document.get("rosbag2_bagfile_information") if isinstance(document, dict) else None
    if not isinstance(info, dict):
        raise BagError(f"{meta_path} is unreadable: it has no 'rosbag2_bagfile_information' mapping")
    for key in ("storage_identifier", "relative_file_paths", "topics_with_message_count"):
        if key not in info:
            raise BagError(f"{meta_path} is unreadable: it lacks the field {key!r}")
    if not isinstance(info["relative_file_paths"], list) or not isinstance(info["topics_with_message_count"], list):
        raise BagError(f"{meta_path} is unreadable: 'relative_file_paths' and 'topics_with_message_count' "
                       "must be lists")
    return info


def _load_metadata_or_hint(bag: Path) -> dict[str, Any]:
    """``load_bag_metadata``, its error ending in how to rebuild the file when the bag's .mcap files are there."""
    try:
        return load_bag_metadata(bag)
    except BagError as exc:
        if any(bag.glob("*.mcap")):
            raise BagError(f"{exc}; run `forest-dataset repair {bag}` to rebuild it from the .mcap files "
                           "(the old one is kept as metadata.yaml.bak)") from None
        raise


def _bag_files(bag: Path, info: Mapping[str, Any]) -> list[Path]:
    return [bag / Path(str(p)).name for p in info["relative_file_paths"]]


def _resolve_bag(path: Path | str) -> tuple[Path, dict[str, Any] | None]:
    """(bag directory or .mcap file, metadata or None); BagError when ``path`` is not a bag."""
    path = Path(path)
    if path.is_file():
        if path.name == "metadata.yaml":
            return _resolve_bag(path.parent)
        if path.suffix != ".mcap":
            raise BagError(f"{path} is not a bag: expected a bag directory or an .mcap file")
        return path, None
    if not path.is_dir():
        raise BagError(f"{path} does not exist: give a bag directory or an .mcap file")
    if (path / "metadata.yaml").is_file():
        return path, _load_metadata_or_hint(path)
    mcaps = sorted(path.glob("*.mcap"), key=split_order)
    if not mcaps:
        raise BagError(f"{path} is not a bag directory: no metadata.yaml and no .mcap files")
    raise BagError(
        f"{path} has {len(mcaps)} .mcap file(s) but no metadata.yaml (the recorder did not close it): "
        f"run `forest-dataset repair {path}`"
    )


def _qos_from_channel(channel: Channel) -> list[dict[str, Any]]:
    text = channel.metadata.get("offered_qos_profiles", "")
    if not text:
        return []
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return []
    return [dict(p) for p in value if isinstance(p, dict)] if isinstance(value, list) else []


def topic_spec(channel: Channel, schema: Schema | None) -> TopicSpec:
    """The recorder's ``TopicSpec`` of an MCAP channel and its schema."""
    return TopicSpec(
        name=channel.topic,
        type_name=schema.name if schema is not None else "",
        msgdef=schema.data.decode("utf-8", "replace") if schema is not None else "",
        type_hash=channel.metadata.get("topic_type_hash", ""),
        qos_profiles=tuple(_qos_from_channel(channel)),
        serialization_format=channel.message_encoding,
        msgdef_encoding=schema.encoding if schema is not None else "",
    )


# ---------------------------------------------------------------------------------- deserialise
_MAX_TRAILING = 16  # bytes after a CDR message still accepted as padding


class _Deserializer:
    """CDR -> rosbags dataclasses, registering types the Kilted typestore lacks from the bag's schemas."""

    def __init__(self) -> None:
        from rosbags.typesys import Stores, get_typestore

        self.store = get_typestore(Stores.ROS2_KILTED)
        self._checked: set[str] = set()

    def ensure(self, msgtype: str, encoding: str, text: str, where: str) -> None:
        if msgtype in self._checked:
            return
        if msgtype not in self.store.fielddefs:
            from rosbags.typesys import get_types_from_idl, get_types_from_msg

            if not text:
                raise BagError(f"{where}: type {msgtype} is unknown and the bag holds no definition for it")
            try:
                types = get_types_from_idl(text) if encoding == "ros2idl" else get_types_from_msg(text, msgtype)
                self.store.register(types)
            except Exception as exc:  # noqa: BLE001 - any parser failure: say which type
                raise BagError(f"{where}: definition of {msgtype} does not parse: {exc}") from None
        self._checked.add(msgtype)

    def __call__(self, data: bytes, msgtype: str, where: str) -> Any:
        try:
            return self.store.deserialize_cdr(data, msgtype)
        except Exception as exc:  # noqa: BLE001 - malformed CDR of any kind: say where
            message = self._with_padding(data, msgtype)
            if message is not None:
                return message
            raise BagError(f"{where}: {msgtype} message does not deserialize: {type(exc).__name__}: {exc}") from None

    def _with_padding(self, data: bytes, msgtype: str) -> Any:
        """The message when all that is wrong is up to ``_MAX_TRAILING`` bytes after it, else None.

        rmw_fastrtps (``rclpy.serialization.serialize_message``, and so bags written from it) can hand
        out a buffer a few bytes longer than the message; rosbags refuses more than 3 such bytes.
        """
        if len(data) < 4 or bytes(data[:2]) not in (b"\x00\x00", b"\x00\x01"):
            return None
        msgdef = self.store.get_msgdef(msgtype)
        func = msgdef.deserialize_cdr_le if data[1] else msgdef.deserialize_cdr_be
        try:
            message, pos = func(memoryview(data)[4:], 0, msgdef.cls, self.store)
        except Exception:  # noqa: BLE001 - not just padding
            return None
        return message if len(data) - 4 - pos <= _MAX_TRAILING else None


# ------------------------------------------------------------------------------------- reading
def read_bag(path: Path | str, topics: Iterable[str] | None = None, *, raw: bool = False) -> Iterator[BagMessage]:
    """Messages of a bag directory or ``.mcap`` file as :class:`BagMessage` tuples, in log-time order per file.

    The bag's structure is checked before this returns (BagError for a bag that is not one, has no
    metadata.yaml, no messages, or a listed file that is missing, truncated or not MCAP); a chunk
    that fails its CRC raises BagError when the reader reaches it, after the good messages before it.
    """
    target, info = _resolve_bag(path)
    wanted = set(topics) if topics is not None else None
    if info is None:
        files = [target]
        storage = "mcap"
    else:
        files = _bag_files(target, info)
        storage = str(info.get("storage_identifier", ""))
        if storage not in ("mcap", "sqlite3"):
            raise BagError(f"{target / 'metadata.yaml'}: storage {storage!r} is not supported (mcap, sqlite3)")
        if not files:
            unlisted = len(list(target.glob("*.mcap")))
            hint = f" but {unlisted} .mcap file(s) are there: run `forest-dataset repair {target}`" if unlisted else ""
            raise BagError(f"{target} is an empty bag: metadata.yaml lists no files{hint}")
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise BagError(f"{target}: file(s) listed in metadata.yaml are missing: {', '.join(missing)}")
        if int(info.get("message_count", 0) or 0) == 0 and storage == "mcap":
            total = 0
            for f in files:
                check = check_mcap(f)
                if not check:
                    raise BagError(f"{f} {check.problem}: run `forest-dataset repair {target}` to recover its "
                                   "complete messages")
                with open(f, "rb") as fh:
                    stats = read_summary(fh, check).statistics
                total += stats.message_count if stats is not None else 1
            if total == 0:
                raise BagError(f"{target} is an empty bag: it holds no messages")
    if storage == "sqlite3":
        return _read_with_rosbags(target, wanted, raw)
    for f in files:
        check = check_mcap(f)
        if not check:
            raise BagError(f"{f} {check.problem}: run `forest-dataset repair {target}` to recover its complete "
                           "messages")
    return _read_mcap_files(files, wanted, raw)


def _read_mcap_files(files: list[Path], topics: set[str] | None, raw: bool) -> Iterator[BagMessage]:
    deserialize = None if raw else _Deserializer()
    for path in files:
        for schema, channel, message in iter_mcap_messages(path, topics):
            msgtype = schema.name if schema is not None else ""
            if deserialize is None:
                yield BagMessage(channel.topic, msgtype, message.log_time, message.data)
                continue
            where = f"{path} topic {channel.topic}"
            if channel.message_encoding != "cdr":
                raise BagError(f"{where}: message encoding {channel.message_encoding!r} is not cdr")
            text = schema.data.decode("utf-8", "replace") if schema is not None else ""
            deserialize.ensure(msgtype, schema.encoding if schema is not None else "", text, where)
            yield BagMessage(channel.topic, msgtype, message.log_time, deserialize(message.data, msgtype, where))


def _read_with_rosbags(bag: Path, topics: set[str] | None, raw: bool) -> Iterator[BagMessage]:
    from rosbags.rosbag2 import Reader
    from rosbags.rosbag2.errors import ReaderError

    deserialize = None if raw else _Deserializer()
    try:
        with Reader(bag) as reader:
            connections = [c for c in reader.connections if topics is None or c.topic in topics]
            if not connections:
                return
            for connection, timestamp, data in reader.messages(connections=connections):
                if deserialize is None:
                    yield BagMessage(connection.topic, connection.msgtype, timestamp, bytes(data))
                    continue
                where = f"{bag} topic {connection.topic}"
                deserialize.ensure(connection.msgtype, "ros2msg", connection.msgdef.data, where)
                yield BagMessage(connection.topic, connection.msgtype, timestamp,
                                 deserialize(data, connection.msgtype, where))
    except ReaderError as exc:
        raise BagError(f"{bag}: {exc}") from None


# ---------------------------------------------------------------------------------------- info
@dataclass(frozen=True)
class BagFileInfo:
    """One storage file of a bag."""

    name: str
    size: int
    message_count: int
    listed: bool  # in metadata.yaml
    problem: str = ""


@dataclass(frozen=True)
class BagTopicInfo:
    """One topic of a bag."""

    name: str
    type: str
    message_count: int
    serialization_format: str = "cdr"
    offered_qos_profiles: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class BagInfo:
    """What ``ros2 bag info`` says about a bag, plus what is wrong with it (``problems``)."""

    path: Path
    storage: str
    version: int
    ros_distro: str
    message_count: int
    start_ns: int
    duration_ns: int
    compression: str
    files: tuple[BagFileInfo, ...]
    topics: tuple[BagTopicInfo, ...]
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing is wrong with the bag."""
        return not self.problems

    @property
    def size(self) -> int:
        """Bytes of all storage files."""
        return sum(f.size for f in self.files)

    def summary(self) -> str:
        """Multi-line text like ``ros2 bag info``."""
        lines = [
            f"Bag:               {self.path}",
            f"Files:             {', '.join(f.name for f in self.files if f.listed) or '(none)'}",
            f"Bag size:          {self.size / 2**20:.1f} MiB",
            f"Storage id:        {self.storage} (metadata version {self.version})",
            f"ROS distro:        {self.ros_distro or '?'}",
            f"Duration:          {self.duration_ns / 1e9:.3f} s",
            f"Start:             {self.start_ns / 1e9:.9f}",
            f"End:               {(self.start_ns + self.duration_ns) / 1e9:.9f}",
            f"Messages:          {self.message_count}",
            f"Chunk compression: {self.compression or 'none'}",
            "Topic information:",
        ]
        width = max((len(t.name) for t in self.topics), default=0)
        for t in self.topics:
            lines.append(f"  {t.name:<{width}} | {t.type} | {t.message_count} msgs | {t.serialization_format}")
        for f in self.files:
            if f.problem:
                lines.append(f"  ! {f.name}: {f.problem}")
        if self.problems:
            lines.append("Problems:")
            lines.extend(f"  - {p}" for p in self.problems)
        else:
            lines.append("Problems:          none")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def bag_info(path: Path | str) -> BagInfo:
    """Summary of a bag directory (or one .mcap file) and the problems found; BagError when it is not a bag."""
    path = Path(path)
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        if not any(path.glob("*.mcap")):
            raise BagError(f"{path} is not a bag directory: no metadata.yaml and no .mcap files")
        return _info_from_files(path, sorted(path.glob("*.mcap"), key=split_order), None)
    target, info = _resolve_bag(path)
    if info is None:
        return _info_from_files(target, [target], None)
    return _info_from_files(target, _bag_files(target, info), info)


def _info_from_files(bag: Path, listed: list[Path], info: Mapping[str, Any] | None) -> BagInfo:
    problems: list[str] = []
    files: list[BagFileInfo] = []
    storage = str(info.get("storage_identifier", "")) if info else "mcap"
    per_file_counts = {}
    if info:
        for entry in info.get("files") or []:
            if isinstance(entry, dict) and "path" in entry:
                per_file_counts[Path(str(entry["path"])).name] = int(entry.get("message_count", 0))
    compressions: set[str] = set()
    scanned_topics: dict[str, list[Any]] = {}
    start, end, total = None, None, 0
    for f in listed:
        if not f.exists():
            files.append(BagFileInfo(f.name, 0, per_file_counts.get(f.name, 0), True, "missing"))
            problems.append(f"{f.name} is listed in metadata.yaml but missing")
            continue
        size = f.stat().st_size
        count = per_file_counts.get(f.name, 0)
        problem = ""
        if storage == "mcap":
            check = check_mcap(f)
            if not check:
                problem = check.problem
                problems.append(f"{f.name} {check.problem}")
            else:
                with open(f, "rb") as fh:
                    try:
                        summary = read_summary(fh, check)
                    except BagError as exc:
                        summary = None
                        problem = str(exc)
                        problems.append(str(exc))
                if summary is not None:
                    compressions.update(c.compression for c in summary.chunk_indexes if c.compression)
                    stats = summary.statistics
                    if stats is not None:
                        count = stats.message_count
                        if stats.message_count:
                            start = stats.message_start_time if start is None else min(start, stats.message_start_time)
                            end = stats.message_end_time if end is None else max(end, stats.message_end_time)
                        for cid, channel in summary.channels.items():
                            schema = summary.schemas.get(channel.schema_id)
                            typ = schema.name if schema is not None else ""
                            entry = scanned_topics.setdefault(channel.topic, [typ, 0, channel])
                            entry[1] += stats.channel_message_counts.get(cid, 0)
        total += count
        files.append(BagFileInfo(f.name, size, count, info is not None, problem))
    if info is None and bag.is_dir():
        problems.append(f"no metadata.yaml: run `forest-dataset repair {bag}`")
    if bag.is_dir():
        listed_names = {f.name for f in listed}
        for extra in sorted(bag.glob("*.mcap"), key=split_order):
            if extra.name not in listed_names:
                check = check_mcap(extra)
                why = check.problem if not check else "complete but not listed in metadata.yaml"
                files.append(BagFileInfo(extra.name, extra.stat().st_size, 0, False, why))
                problems.append(f"{extra.name} is not in metadata.yaml ({why}): run `forest-dataset repair {bag}`")
    if info is not None:
        topics = tuple(
            BagTopicInfo(
                name=str(t["topic_metadata"]["name"]),
                type=str(t["topic_metadata"]["type"]),
                message_count=int(t.get("message_count", 0)),
                serialization_format=str(t["topic_metadata"].get("serialization_format", "cdr")),
                offered_qos_profiles=tuple(qos_profiles(t["topic_metadata"].get("offered_qos_profiles"))),
            )
            for t in info["topics_with_message_count"]
        )
        message_count = int(info.get("message_count", 0) or 0)
        start_ns = int((info.get("starting_time") or {}).get("nanoseconds_since_epoch", 0) or 0)
        duration_ns = int((info.get("duration") or {}).get("nanoseconds", 0) or 0)
        if storage == "mcap" and not problems and message_count != total:
            problems.append(f"metadata.yaml counts {message_count} messages, the files hold {total}")
    else:
        topics = tuple(
            BagTopicInfo(name, typ, count, channel.message_encoding, tuple(_qos_from_channel(channel)))
            for name, (typ, count, channel) in scanned_topics.items()
        )
        message_count = total
        start_ns = start or 0
        duration_ns = (end - start) if start is not None and end is not None else 0
    return BagInfo(
        path=bag,
        storage=storage,
        version=int(info.get("version", 0)) if info else 0,
        ros_distro=str(info.get("ros_distro", "") or "") if info else "",
        message_count=message_count,
        start_ns=start_ns,
        duration_ns=duration_ns,
        compression=",".join(sorted(compressions)),
        files=tuple(files),
        topics=topics,
        problems=tuple(problems),
    )


def qos_profiles(value: Any) -> list[dict[str, Any]]:
    """Offered QoS profiles from metadata.yaml (a YAML string or a list); [] when unreadable."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value else []
        except yaml.YAMLError:
            return []
    return [dict(p) for p in value if isinstance(p, dict)] if isinstance(value, list) else []
