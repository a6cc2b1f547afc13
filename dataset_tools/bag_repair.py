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
    metadata_problem: str = ""  # why the old metadata.yaml could not be used, when it could not
    metadata_backup: str = ""  # where the old metadata.yaml was kept

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
        if self.bag.suffix == ".mcap":  # a single file: no metadata.yaml
            return "\n".join(lines)
        if self.metadata_problem:
            lines.append(f"  the old metadata.yaml was unreadable ({self.metadata_problem})")
        if self.metadata_rebuilt:
            kept = f"; the old one kept as {self.metadata_backup}" if self.metadata_backup else ""
            lines.append(f"  metadata.yaml rebuilt from the files{kept}")
        else:
            lines.append("  metadata.yaml unchanged")
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


def _repair_file(path: Path) -> tuple[FileRepair, _FileScan | None]:
    """Make one MCAP file complete: rewritten with every complete message when it is damaged, else untouched.

    Returns what was done and the scan of the messages kept (None when nothing could be kept).
    """
    check = check_mcap(path)
    if check.size == 0 or (not check and check.problem.startswith("is not an MCAP")):
        damaged = _free_name(path.with_name(path.name + ".damaged"))
        os.replace(path, damaged)
        return FileRepair(path.name, "unrecoverable", 0, damaged.name, detail=check.problem), None
    scan = _scan_file(path)
    if check and scan.clean:
        return FileRepair(path.name, "ok", scan.record.message_count), scan
    detail = check.problem if not check else scan.stop_reason or "corrupt chunks"
    scan, kept, damaged_name = _rewrite(path, scan.compression)
    repair = FileRepair(path.name, "unrecoverable" if kept is None else "recovered", scan.record.message_count,
                        damaged_name, scan.bad_chunks, scan.orphans, detail)
    return repair, (None if kept is None else scan)


def repair_bag(path: Path | str) -> RepairReport:
    """Make every MCAP file of a bag complete and rebuild metadata.yaml from the files.

    A file without a footer (recorder killed mid-split) or with corrupt chunks is rewritten with every
    complete message it holds; the original is renamed ``<file>.damaged`` and never deleted. Files
    that are complete and whose chunks pass their CRCs are left untouched. ``path`` may also be a
    single ``.mcap`` file, repaired the same way (no metadata.yaml). BagError when ``path`` is
    neither, or a bag directory not in MCAP storage.
    """
    bag = Path(path)
    if bag.is_file():
        if bag.suffix != ".mcap":
            raise BagError(f"{bag} is not a bag: give a bag directory or an .mcap file")
        repair, _ = _repair_file(bag)
        return RepairReport(bag, (repair,), repair.message_count, False)
    if not bag.is_dir():
        raise BagError(f"{bag} is not a bag directory" + (" (it does not exist)" if not bag.exists() else ""))
    meta_path = bag / "metadata.yaml"
    old_info: dict[str, Any] | None = None
    old_text = ""
    old_problem = ""
    if meta_path.is_file():
        old_text = meta_path.read_text(encoding="utf-8", errors="replace")
        try:
            old_info = load_bag_metadata(bag)
        except BagError as exc:
            old_info = None  # unreadable: rebuilt from the files, the old one is kept as .bak
            old_problem = str(exc).split(" is unreadable: ", 1)[-1]
        if old_info is not None and old_info.get("storage_identifier") not in (None, "mcap"):
            storage = old_info.get("storage_identifier")
            raise BagError(f"{bag}: storage {storage!r} is not MCAP; repair handles MCAP bags only")
    mcaps = sorted((p for p in bag.glob("*.mcap") if p.is_file()), key=split_order)
    if not mcaps and old_info is None:
        if old_problem:
            raise BagError(f"{meta_path} is unreadable: {old_problem}; {bag} holds no .mcap files to rebuild it "
                           "from; nothing was changed")
        raise BagError(f"{bag} is not a bag directory: no metadata.yaml and no .mcap files")

    repairs: list[FileRepair] = []
    records: list[FileRecord] = []
    specs: dict[str, TopicSpec] = {}
    for mcap_path in mcaps:
        repair, scan = _repair_file(mcap_path)
        repairs.append(repair)
        if scan is None:
            continue
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
    backup = ""
    if rebuilt:
        if meta_path.is_file():
            # the old file byte for byte, beside any earlier backup (never over it)
            backup_path = _free_name(bag / "metadata.yaml.bak")
            backup_path.write_bytes(meta_path.read_bytes())
            backup = backup_path.name
        write_metadata(bag, information)
    return RepairReport(bag, tuple(repairs), information["message_count"], rebuilt, old_problem, backup)
