"""MCAP files of a bag, read without ROS: is a file complete, its records one by one, its messages in log-time order.

``bags`` reads, inspects and repairs whole bags with these; docs/dataset_tools.md ("Bags") says what each tool does.
"""

from __future__ import annotations

import heapq
import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from mcap.data_stream import ReadDataStream
from mcap.exceptions import McapError
from mcap.opcode import Opcode
from mcap.records import Channel, Chunk, ChunkIndex, Message, Schema, Statistics
from mcap.stream_reader import breakup_chunk
from zstandard import ZstdError

from forest_perception.cli_args import InputError

MAGIC = b"\x89MCAP0\r\n"
_FOOTER_BYTES = 9 + 20  # opcode + length + summary_start, summary_offset_start, summary_crc
# what a damaged record raises while it is decoded (zstandard.ZstdError, lz4's RuntimeError included)
_DECODE_ERRORS = (McapError, ValueError, struct.error, EOFError, UnicodeDecodeError, KeyError, zlib.error,
                  RuntimeError, ZstdError)


class BagError(InputError):
    """A bag (or one of its files) that cannot be read or repaired; the message says which and why."""


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
class McapSummary:
    """What the summary section of a complete MCAP file lists."""

    schemas: dict[int, Schema] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    chunk_indexes: list[ChunkIndex] = field(default_factory=list)
    statistics: Statistics | None = None


def read_summary(f: io.BufferedReader, check: McapCheck) -> McapSummary:
    """Schemas, channels, chunk indexes and statistics from the summary section of a complete file."""
    summary = McapSummary()
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


class Scan(NamedTuple):
    """One step of ``scan_records``."""

    kind: str  # "schema", "channel", "message", "chunk", "bad_chunk", "end" (data end / footer), "stop" (cut short)
    offset: int
    record: Any  # the record, or the reason (str) for bad_chunk / stop


def scan_records(f: io.BufferedReader, size: int) -> Iterator[Scan]:
    """Walk the data section record by record, opening chunks; stop at the first record that is cut short."""
    f.seek(0)
    if f.read(8) != MAGIC:
        yield Scan("stop", 0, "not an MCAP file (bad magic)")
        return
    pos = 8
    while True:
        if pos == size:
            yield Scan("stop", pos, f"file ends at byte {size} without a footer")
            return
        if pos + 9 > size:
            yield Scan("stop", pos, f"record header at byte {pos} cut short by the end of the file ({size} bytes)")
            return
        f.seek(pos)
        opcode, length = struct.unpack("<BQ", f.read(9))
        if opcode == 0 or 0x10 <= opcode < 0x80:
            yield Scan("stop", pos, f"invalid record opcode 0x{opcode:02x} at byte {pos}")
            return
        end = pos + 9 + length
        if end > size:
            yield Scan("stop", pos, f"record (opcode 0x{opcode:02x}) at byte {pos} needs {length} bytes, the file "
                                     f"ends {size - pos - 9} bytes in")
            return
        if opcode in (Opcode.DATA_END, Opcode.FOOTER):
            yield Scan("end", pos, None)
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
                    yield Scan("chunk", pos, chunk.compression)
            except _DECODE_ERRORS as exc:
                what = "chunk" if opcode == Opcode.CHUNK else f"record (opcode 0x{opcode:02x})"
                yield Scan("bad_chunk", pos, f"{what} at byte {pos} is corrupt: {type(exc).__name__}: {exc}")
                records = []
            for record in records:
                kind = {Schema: "schema", Channel: "channel", Message: "message"}.get(type(record))
                if kind is not None:
                    yield Scan(kind, pos, record)
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


def iter_mcap_messages(path: Path, topics: set[str] | None) -> Iterator[tuple[Schema | None, Channel, Message]]:
    """(schema, channel, message) of a complete MCAP file in log-time order, checking every chunk's CRC."""
    check = check_mcap(path)
    if not check:
        raise BagError(f"{path} {check.problem}")
    with open(path, "rb") as f:
        summary = read_summary(f, check)
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
    for scan in scan_records(f, check.size):
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
