"""Read, inspect and repair rosbag2 bags without ROS (rosbags and mcap; no rclpy).

* :func:`read_bag` yields ``(topic, msgtype, log_time_ns, message)`` from a bag directory (MCAP or
  sqlite3 storage, ours or written by rosbag2) or a single ``.mcap`` file; messages are rosbags
  dataclasses with the ROS field names (``Image.data`` is a numpy uint8 array).
* :func:`bag_info` summarises a bag like ``ros2 bag info`` and lists what is wrong with it.
* :func:`repair_bag` recovers every complete message of MCAP files cut short (a recorder killed in
  the middle of a split) or with corrupt chunks, writes each as a new complete file (the damaged
  original is kept as ``<file>.damaged``) and rebuilds ``metadata.yaml`` from the files.

A bag that cannot be read raises :class:`BagError` naming the file, the byte offset and what was
wrong, before any message of a bad file is yielded; corrupt data is never returned as messages.
"""

from __future__ import annotations

import heapq
import io
import os
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from mcap.data_stream import ReadDataStream
from mcap.exceptions import McapError
from mcap.opcode import Opcode
from mcap.records import Channel, Chunk, ChunkIndex, Message, Schema, Statistics
from mcap.stream_reader import breakup_chunk
from mcap.writer import CompressionType, IndexType
from mcap.writer import Writer as McapWriter
from zstandard import ZstdError

from forest_perception.recorder import (
    LIBRARY,
    MCAP_PROFILE,
    FileRecord,
    TopicSpec,
    bag_metadata,
    write_metadata,
)

MAGIC = b"\x89MCAP0\r\n"
_FOOTER_BYTES = 9 + 20  # opcode + length + summary_start, summary_offset_start, summary_crc
# what a damaged record raises while it is decoded (zstandard.ZstdError, lz4's RuntimeError included)
_DECODE_ERRORS = (McapError, ValueError, struct.error, EOFError, UnicodeDecodeError, KeyError, zlib.error,
                  RuntimeError, ZstdError)


class BagError(Exception):
    """A bag (or one of its files) that cannot be read or repaired; the message says which and why."""


class BagMessage(NamedTuple):
    """One message read from a bag."""

    topic: str
    msgtype: str
    log_time_ns: int
    message: Any  # rosbags dataclass, or the raw CDR bytes with read_bag(raw=True)


# ------------------------------------------------------------------------------- MCAP structure
@dataclass(frozen=True)
class McapCheck:
    """Result of :func:`check_mcap`: whether the file is a complete MCAP and, if not, why."""

    path: Path
    size: int
    complete: bool
    problem: str = ""
    summary_start: int = 0

    def __bool__(self) -> bool:
        return self.complete


def check_mcap(path: Path | str) -> McapCheck:
    """Cheap structural check (magic, header, footer, summary position) without reading the data."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        return McapCheck(path, 0, False, f"cannot be read: {exc.strerror or exc}")
    if size == 0:
        return McapCheck(path, 0, False, "is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(8 + 9)
        if head[:8] != MAGIC[: len(head[:8])] or len(head) < 8:
            return McapCheck(path, size, False, f"is not an MCAP file (starts with {head[:8]!r} at byte 0)")
        if len(head) < 17:
            return McapCheck(path, size, False, f"is truncated at byte {size}: it ends inside the header")
        if head[8] != Opcode.HEADER:
            return McapCheck(path, size, False, f"is corrupt at byte 8: expected the header record, got opcode "
                                                f"0x{head[8]:02x}")
        if size < 8 + _FOOTER_BYTES + 8 or not _ends_with_magic(f, size):
            return McapCheck(path, size, False, f"is truncated at byte {size}: no footer (the recorder did not "
                                                "finish this file)")
        f.seek(size - 8 - _FOOTER_BYTES)
        footer_bytes = f.read(_FOOTER_BYTES)
        opcode, length = struct.unpack_from("<BQ", footer_bytes)
        if opcode != Opcode.FOOTER or length != 20:
            return McapCheck(path, size, False, f"is corrupt at byte {size - 8 - _FOOTER_BYTES}: bad footer record")
        summary_start, summary_offset_start, _crc = struct.unpack_from("<QQI", footer_bytes, 9)
        footer_at = size - 8 - _FOOTER_BYTES
        if summary_start and not 8 < summary_start <= footer_at:
            return McapCheck(path, size, False, f"is corrupt at byte {footer_at}: summary offset {summary_start} "
                                                f"outside the file")
        if summary_offset_start and not summary_start <= summary_offset_start <= footer_at:
            return McapCheck(path, size, False, f"is corrupt at byte {footer_at}: summary offsets at "
                                                f"{summary_offset_start} outside the summary")
    return McapCheck(path, size, True, "", summary_start)


def _ends_with_magic(f: io.BufferedReader, size: int) -> bool:
    f.seek(size - 8)
    return f.read(8) == MAGIC


@dataclass
class _Summary:
    schemas: dict[int, Schema] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    chunk_indexes: list[ChunkIndex] = field(default_factory=list)
    statistics: Statistics | None = None


def _read_summary(f: io.BufferedReader, check: McapCheck) -> _Summary:
    """Schemas, channels, chunk indexes and statistics from the summary section of a complete file."""
    summary = _Summary()
    footer_at = check.size - 8 - _FOOTER_BYTES
    pos = check.summary_start
    if not pos:
        return summary
    f.seek(pos)
    data = f.read(footer_at - pos)
    offset = 0
    while offset < len(data):
        if offset + 9 > len(data):
            raise BagError(f"{check.path} is corrupt at byte {pos + offset}: summary record cut short")
        opcode, length = struct.unpack_from("<BQ", data, offset)
        body = data[offset + 9 : offset + 9 + length]
        if len(body) != length:
            raise BagError(f"{check.path} is corrupt at byte {pos + offset}: summary record of {length} bytes "
                           "runs past the footer")
        stream = ReadDataStream(io.BytesIO(body))
        try:
            if opcode == Opcode.SCHEMA:
                schema = Schema.read(stream)
                summary.schemas[schema.id] = schema
            elif opcode == Opcode.CHANNEL:
                channel = Channel.read(stream)
                summary.channels[channel.id] = channel
            elif opcode == Opcode.CHUNK_INDEX:
                summary.chunk_indexes.append(ChunkIndex.read(stream))
            elif opcode == Opcode.STATISTICS:
                summary.statistics = Statistics.read(stream)
        except _DECODE_ERRORS as exc:
            raise BagError(f"{check.path} is corrupt at byte {pos + offset}: summary record (opcode "
                           f"0x{opcode:02x}) does not decode: {exc}") from None
        offset += 9 + length
    return summary


class _Scan(NamedTuple):
    kind: str  # "schema", "channel", "message", "chunk", "bad_chunk", "end" (data end / footer), "stop" (cut short)
    offset: int
    record: Any  # the record, or the reason (str) for bad_chunk / stop


def _scan_records(f: io.BufferedReader, size: int) -> Iterator[_Scan]:
    """Walk the data section record by record, opening chunks; stop at the first record that is cut short."""
    f.seek(0)
    if f.read(8) != MAGIC:
        yield _Scan("stop", 0, "not an MCAP file (bad magic)")
        return
    pos = 8
    while True:
        if pos == size:
            yield _Scan("stop", pos, f"file ends at byte {size} without a footer")
            return
        if pos + 9 > size:
            yield _Scan("stop", pos, f"record header at byte {pos} cut short by the end of the file ({size} bytes)")
            return
        f.seek(pos)
        opcode, length = struct.unpack("<BQ", f.read(9))
        if opcode == 0 or 0x10 <= opcode < 0x80:
            yield _Scan("stop", pos, f"invalid record opcode 0x{opcode:02x} at byte {pos}")
            return
        end = pos + 9 + length
        if end > size:
            yield _Scan("stop", pos, f"record (opcode 0x{opcode:02x}) at byte {pos} needs {length} bytes, the file "
                                     f"ends {size - pos - 9} bytes in")
            return
        if opcode in (Opcode.DATA_END, Opcode.FOOTER):
            yield _Scan("end", pos, None)
            return
        if opcode in (Opcode.SCHEMA, Opcode.CHANNEL, Opcode.MESSAGE, Opcode.CHUNK):
            body = f.read(length)
            stream = ReadDataStream(io.BytesIO(body))
            try:
                if opcode == Opcode.SCHEMA:
                    records: list[Any] = [Schema.read(stream)]
                elif opcode == Opcode.CHANNEL:
                    records = [Channel.read(stream)]
                elif opcode == Opcode.MESSAGE:
                    records = [Message.read(stream, length)]
                else:
                    chunk = Chunk.read(stream)
                    records = breakup_chunk(chunk, validate_crc=True)
                    yield _Scan("chunk", pos, chunk.compression)
            except _DECODE_ERRORS as exc:
                what = "chunk" if opcode == Opcode.CHUNK else f"record (opcode 0x{opcode:02x})"
                yield _Scan("bad_chunk", pos, f"{what} at byte {pos} is corrupt: {type(exc).__name__}: {exc}")
                records = []
            for record in records:
                kind = {Schema: "schema", Channel: "channel", Message: "message"}.get(type(record))
                if kind is not None:
                    yield _Scan(kind, pos, record)
        pos = end


def _chunk_messages(f: io.BufferedReader, path: Path, index: ChunkIndex) -> list[Message]:
    f.seek(index.chunk_start_offset)
    head = f.read(9)
    if len(head) != 9:
        raise BagError(f"{path} is corrupt: chunk index points at byte {index.chunk_start_offset}, past the end")
    opcode, length = struct.unpack("<BQ", head)
    if opcode != Opcode.CHUNK:
        raise BagError(f"{path} is corrupt at byte {index.chunk_start_offset}: expected a chunk, got opcode "
                       f"0x{opcode:02x}")
    body = f.read(length)
    if len(body) != length:
        raise BagError(f"{path} is truncated at byte {index.chunk_start_offset}: chunk of {length} bytes cut short")
    try:
        records = breakup_chunk(Chunk.read(ReadDataStream(io.BytesIO(body))), validate_crc=True)
    except _DECODE_ERRORS as exc:
        raise BagError(f"{path} is corrupt at byte {index.chunk_start_offset}: chunk does not decode "
                       f"({type(exc).__name__}: {exc})") from None
    return [r for r in records if isinstance(r, Message)]


def _iter_mcap_messages(path: Path, topics: set[str] | None) -> Iterator[tuple[Schema | None, Channel, Message]]:
    """(schema, channel, message) of a complete MCAP file in log-time order, checking every chunk's CRC."""
    check = check_mcap(path)
    if not check:
        raise BagError(f"{path} {check.problem}")
    with open(path, "rb") as f:
        summary = _read_summary(f, check)
        if not summary.chunk_indexes:
            # no index (unchunked file or no summary): walk the data section, strictly
            yield from _iter_linear(f, check, topics)
            return
        heap: list[tuple[int, int, int, Any]] = []
        order = 0
        for index in summary.chunk_indexes:
            heap.append((index.message_start_time, 0, order, index))
            order += 1
        heapq.heapify(heap)
        while heap:
            _, kind, _, item = heapq.heappop(heap)
            if kind == 0:
                for message in _chunk_messages(f, path, item):
                    heapq.heappush(heap, (message.log_time, 1, order, message))
                    order += 1
                continue
            channel = summary.channels.get(item.channel_id)
            if channel is None:
                raise BagError(f"{path} is corrupt: message on channel {item.channel_id}, which the summary lacks")
            if topics is not None and channel.topic not in topics:
                continue
            yield summary.schemas.get(channel.schema_id), channel, item


def _iter_linear(
    f: io.BufferedReader, check: McapCheck, topics: set[str] | None
) -> Iterator[tuple[Schema | None, Channel, Message]]:
    schemas: dict[int, Schema] = {}
    channels: dict[int, Channel] = {}
    for scan in _scan_records(f, check.size):
        if scan.kind in ("stop", "bad_chunk"):
            raise BagError(f"{check.path} {scan.record}")
        if scan.kind == "end":
            return
        if scan.kind == "chunk":
            continue
        if scan.kind == "schema":
            schemas[scan.record.id] = scan.record
        elif scan.kind == "channel":
            channels[scan.record.id] = scan.record
        else:
            channel = channels.get(scan.record.channel_id)
            if channel is None:
                raise BagError(f"{check.path} is corrupt at byte {scan.offset}: message on unknown channel "
                               f"{scan.record.channel_id}")
            if topics is None or channel.topic in topics:
                yield schemas.get(channel.schema_id), channel, scan.record


# ------------------------------------------------------------------------------------- metadata
def _split_index(path: Path) -> tuple[int, str]:
    match = re.search(r"_(\d+)\.mcap$", path.name)
    return (int(match.group(1)) if match else 1 << 30, path.name)


def _load_metadata(bag: Path) -> dict[str, Any]:
    meta_path = bag / "metadata.yaml"
    try:
        document = yaml.safe_load(meta_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BagError(f"{meta_path} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise BagError(f"{meta_path} is not valid YAML: {exc}") from None
    info = document.get("rosbag2_bagfile_information") if isinstance(document, dict) else None
    if not isinstance(info, dict):
        raise BagError(f"{meta_path} has no 'rosbag2_bagfile_information' mapping")
    for key in ("storage_identifier", "relative_file_paths", "topics_with_message_count"):
        if key not in info:
            raise BagError(f"{meta_path} lacks the field {key!r}")
    if not isinstance(info["relative_file_paths"], list) or not isinstance(info["topics_with_message_count"], list):
        raise BagError(f"{meta_path}: 'relative_file_paths' and 'topics_with_message_count' must be lists")
    return info


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
        raise BagError(f"{path} does not exist")
    if (path / "metadata.yaml").is_file():
        return path, _load_metadata(path)
    mcaps = sorted(path.glob("*.mcap"), key=_split_index)
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


def _spec_from_channel(channel: Channel, schema: Schema | None) -> TopicSpec:
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
                    raise BagError(f"{f} {check.problem}")
                with open(f, "rb") as fh:
                    stats = _read_summary(fh, check).statistics
                total += stats.message_count if stats is not None else 1
            if total == 0:
                raise BagError(f"{target} is an empty bag: it holds no messages")
    if storage == "sqlite3":
        return _read_with_rosbags(target, wanted, raw)
    for f in files:
        check = check_mcap(f)
        if not check:
            hint = f": run `forest-dataset repair {target}`" if info is not None else ""
            raise BagError(f"{f} {check.problem}{hint}")
    return _read_mcap_files(files, wanted, raw)


def _read_mcap_files(files: list[Path], topics: set[str] | None, raw: bool) -> Iterator[BagMessage]:
    deserialize = None if raw else _Deserializer()
    for path in files:
        for schema, channel, message in _iter_mcap_messages(path, topics):
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
        return _info_from_files(path, sorted(path.glob("*.mcap"), key=_split_index), None)
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
                        summary = _read_summary(fh, check)
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
        for extra in sorted(bag.glob("*.mcap"), key=_split_index):
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
                offered_qos_profiles=tuple(_as_profiles(t["topic_metadata"].get("offered_qos_profiles"))),
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


def _as_profiles(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value else []
        except yaml.YAMLError:
            return []
    return [dict(p) for p in value if isinstance(p, dict)] if isinstance(value, list) else []


# -------------------------------------------------------------------------------------- repair
@dataclass(frozen=True)
class FileRepair:
    """What :func:`repair_bag` did to one MCAP file."""

    name: str
    action: str  # "ok" (kept as is), "recovered" (rewritten), "unrecoverable" (nothing to keep)
    message_count: int
    damaged_copy: str = ""  # the original, renamed, when it was rewritten or set aside
    bad_chunks: int = 0
    orphan_messages: int = 0  # messages whose channel record was lost
    detail: str = ""


@dataclass(frozen=True)
class RepairReport:
    """Result of :func:`repair_bag`."""

    bag: Path
    files: tuple[FileRepair, ...]
    message_count: int
    metadata_rebuilt: bool

    @property
    def changed(self) -> bool:
        """True when any file was rewritten or set aside."""
        return any(f.action != "ok" for f in self.files)

    def summary(self) -> str:
        """Multi-line text for the command line."""
        lines = [f"repair {self.bag}: {self.message_count} messages in "
                 f"{sum(f.action != 'unrecoverable' for f in self.files)} file(s)"]
        for f in self.files:
            text = f"  {f.name}: {f.action}, {f.message_count} messages"
            if f.bad_chunks:
                text += f", {f.bad_chunks} corrupt chunk(s) skipped"
            if f.orphan_messages:
                text += f", {f.orphan_messages} message(s) without their channel skipped"
            if f.damaged_copy:
                text += f"; original kept as {f.damaged_copy}"
            if f.detail:
                text += f" ({f.detail})"
            lines.append(text)
        lines.append("  metadata.yaml rebuilt from the files" if self.metadata_rebuilt else "  metadata.yaml unchanged")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass
class _FileScan:
    record: FileRecord
    specs: dict[str, TopicSpec]
    clean: bool
    bad_chunks: int
    orphans: int
    stop_reason: str
    compression: str


def _scan_file(path: Path, writer: McapWriter | None = None) -> _FileScan:
    """Count (and optionally copy into ``writer``) every complete message of an MCAP file."""
    size = path.stat().st_size
    schemas: dict[int, Schema] = {}
    channels: dict[int, Channel] = {}
    specs: dict[str, TopicSpec] = {}
    new_schema: dict[int, int] = {}
    new_channel: dict[int, int] = {}
    counts: dict[str, int] = {}
    start = end = None
    bad = orphans = 0
    stop_reason = ""
    compression = ""
    with open(path, "rb") as f:
        for scan in _scan_records(f, size):
            if scan.kind == "stop":
                stop_reason = scan.record
                break
            if scan.kind == "end":
                break
            if scan.kind == "bad_chunk":
                bad += 1
                continue
            if scan.kind == "chunk":
                compression = compression or scan.record
                continue
            record = scan.record
            if scan.kind == "schema":
                schemas[record.id] = record
                if writer is not None and record.id not in new_schema:
                    new_schema[record.id] = writer.register_schema(record.name, record.encoding, record.data)
            elif scan.kind == "channel":
                channels[record.id] = record
                schema = schemas.get(record.schema_id)
                specs.setdefault(record.topic, _spec_from_channel(record, schema))
                counts.setdefault(record.topic, 0)
                if writer is not None and record.id not in new_channel:
                    new_channel[record.id] = writer.register_channel(
                        record.topic, record.message_encoding, new_schema.get(record.schema_id, 0),
                        dict(record.metadata),
                    )
            else:
                channel = channels.get(record.channel_id)
                if channel is None:
                    orphans += 1
                    continue
                counts[channel.topic] += 1
                start = record.log_time if start is None else min(start, record.log_time)
                end = record.log_time if end is None else max(end, record.log_time)
                if writer is not None:
                    writer.add_message(new_channel[record.channel_id], record.log_time, record.data,
                                       record.publish_time, record.sequence)
    total = sum(counts.values())
    record = FileRecord(path.name, total, start or 0, end or 0, counts)
    clean = not stop_reason and not bad and not orphans
    return _FileScan(record, specs, clean, bad, orphans, stop_reason, compression)


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{n}")
        n += 1
    return candidate


def _rewrite(path: Path, compression: str) -> tuple[_FileScan, Path | None, str]:
    """Write the recoverable messages of ``path`` into a new complete file in its place; the original is kept."""
    tmp = path.with_name(path.name + ".repair-tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "wb") as out:
        writer = McapWriter(
            out,
            compression=CompressionType.ZSTD if compression == "zstd" else CompressionType.NONE,
            index_types=IndexType.ALL,
        )
        writer.start(profile=MCAP_PROFILE, library=f"{LIBRARY} (repaired)")
        scan = _scan_file(path, writer)
        writer.finish()
        out.flush()
        os.fsync(out.fileno())
    damaged = _free_name(path.with_name(path.name + ".damaged"))
    os.replace(path, damaged)  # first keep the original, then put the recovered file in its place
    if scan.record.message_count == 0:
        tmp.unlink()
        return scan, None, damaged.name
    os.replace(tmp, path)
    return scan, path, damaged.name


def repair_bag(path: Path | str) -> RepairReport:
    """Make every MCAP file of a bag complete and rebuild metadata.yaml from the files.

    A file without a footer (recorder killed mid-split) or with corrupt chunks is rewritten with every
    complete message it holds; the original is renamed ``<file>.damaged`` and never deleted. Files
    that are complete and whose chunks pass their CRCs are left untouched. BagError when ``path`` is
    not a bag directory or not MCAP storage.
    """
    bag = Path(path)
    if not bag.is_dir():
        raise BagError(f"{bag} is not a bag directory" + (" (it does not exist)" if not bag.exists() else ""))
    meta_path = bag / "metadata.yaml"
    old_info: dict[str, Any] | None = None
    old_text = ""
    if meta_path.is_file():
        old_text = meta_path.read_text(encoding="utf-8", errors="replace")
        try:
            old_info = _load_metadata(bag)
        except BagError:
            old_info = None  # unreadable: rebuilt from the files, the old one is kept as .bak
        if old_info is not None and old_info.get("storage_identifier") not in (None, "mcap"):
            storage = old_info.get("storage_identifier")
            raise BagError(f"{bag}: storage {storage!r} is not MCAP; repair handles MCAP bags only")
    mcaps = sorted((p for p in bag.glob("*.mcap") if p.is_file()), key=_split_index)
    if not mcaps and old_info is None:
        raise BagError(f"{bag} is not a bag directory: no metadata.yaml and no .mcap files")

    repairs: list[FileRepair] = []
    records: list[FileRecord] = []
    specs: dict[str, TopicSpec] = {}
    for mcap_path in mcaps:
        check = check_mcap(mcap_path)
        if check.size == 0 or (not check and check.problem.startswith("is not an MCAP")):
            damaged = _free_name(mcap_path.with_name(mcap_path.name + ".damaged"))
            os.replace(mcap_path, damaged)
            repairs.append(FileRepair(mcap_path.name, "unrecoverable", 0, damaged.name, detail=check.problem))
            continue
        scan = _scan_file(mcap_path)
        if check and scan.clean:
            repairs.append(FileRepair(mcap_path.name, "ok", scan.record.message_count))
        else:
            detail = check.problem if not check else scan.stop_reason or "corrupt chunks"
            scan, kept, damaged_name = _rewrite(mcap_path, scan.compression)
            if kept is None:
                repairs.append(FileRepair(mcap_path.name, "unrecoverable", 0, damaged_name, scan.bad_chunks,
                                          scan.orphans, detail))
                continue
            repairs.append(FileRepair(mcap_path.name, "recovered", scan.record.message_count, damaged_name,
                                      scan.bad_chunks, scan.orphans, detail))
        records.append(scan.record)
        for name, spec in scan.specs.items():
            specs.setdefault(name, spec)

    # topic order and QoS as the old metadata had them, then topics only the files know
    ordered: list[TopicSpec] = []
    if old_info is not None:
        for entry in old_info.get("topics_with_message_count") or []:
            try:
                meta = entry["topic_metadata"]
                name = str(meta["name"])
            except (KeyError, TypeError):
                continue
            if name in specs:
                ordered.append(specs.pop(name))
            else:
                ordered.append(TopicSpec(
                    name=name, type_name=str(meta.get("type", "")), msgdef="",
                    type_hash=str(meta.get("type_description_hash", "") or ""),
                    qos_profiles=tuple(_as_profiles(meta.get("offered_qos_profiles"))),
                    serialization_format=str(meta.get("serialization_format", "cdr")),
                ))
    ordered.extend(specs.values())
    custom = (old_info or {}).get("custom_data") or {}
    information = bag_metadata(
        records,
        ordered,
        custom_data=custom if isinstance(custom, dict) else {},
        ros_distro=str((old_info or {}).get("ros_distro", "") or "kilted"),
    )
    new_text = yaml.safe_dump({"rosbag2_bagfile_information": information}, sort_keys=False)
    rebuilt = new_text != old_text
    if rebuilt:
        if old_text:
            (bag / "metadata.yaml.bak").write_text(old_text, encoding="utf-8")
        write_metadata(bag, information)
    return RepairReport(bag, tuple(repairs), information["message_count"], rebuilt)
