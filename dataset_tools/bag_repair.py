"""``forest-dataset repair``: make every MCAP file of a bag complete again and rebuild its ``metadata.yaml``.

A file cut short (a recorder killed mid-split) or with corrupt chunks is rewritten with every complete message it
holds; the original is kept as ``<file>.damaged``. docs/dataset_tools.md ("Bags") has the details.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mcap.records import Channel, Schema
from mcap.writer import CompressionType, IndexType
from mcap.writer import Writer as McapWriter

from forest_perception.dataset_tools.bags import load_bag_metadata, qos_profiles, split_order, topic_spec
from forest_perception.dataset_tools.mcap_files import BagError, check_mcap, scan_records
from forest_perception.recorder import (
    LIBRARY,
    MCAP_PROFILE,
    FileRecord,
    TopicSpec,
    bag_metadata,
    write_metadata,
)


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
        for scan in scan_records(f, size):
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
                specs.setdefault(record.topic, topic_spec(record, schema))
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
            old_info = load_bag_metadata(bag)
        except BagError:
            old_info = None  # unreadable: rebuilt from the files, the old one is kept as .bak
        if old_info is not None and old_info.get("storage_identifier") not in (None, "mcap"):
            storage = old_info.get("storage_identifier")
            raise BagError(f"{bag}: storage {storage!r} is not MCAP; repair handles MCAP bags only")
    mcaps = sorted((p for p in bag.glob("*.mcap") if p.is_file()), key=split_order)
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
                    qos_profiles=tuple(qos_profiles(meta.get("offered_qos_profiles"))),
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
