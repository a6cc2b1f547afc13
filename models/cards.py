"""Model cards: ``<name>.md`` and ``<name>.json`` beside every exported ONNX model (what it is, how it was made,
its metrics, its PyTorch checkpoint and per-style table); docs/training.md ("Export", "Shipping weights")."""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from forest_perception.inference import DEFAULT_MEAN, DEFAULT_STD, file_sha256, read_onnx_metadata
from forest_perception.models.outputs import write_text_atomic
from forest_perception.models.provenance import git_commit


def _onnx_summary(onnx_path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in model.graph.input[0].type.tensor_type.shape.dim]
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"opset": opset, "input_name": model.graph.input[0].name, "input_shape": dims,
            "output_name": model.graph.output[0].name, "node_count": len(model.graph.node), "op_counts": ops}


def _parse_json(value: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def write_model_card(onnx_path: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Path:
    """Write ``<name>.md`` and ``<name>.json`` beside the model (metadata, file facts, ``info``); return the .md.

    ``info`` may hold ``metrics`` (dict), ``params``, ``flops``, ``train_command``, ``export_command``, ``int8``
    (a ``compare_int8`` report) and ``notes``; it overrides the metadata.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ValueError(f"model {str(onnx_path)!r} does not exist")
    meta = {key: _parse_json(value) for key, value in read_onnx_metadata(onnx_path).items()}
    card: dict[str, Any] = {
        "name": onnx_path.stem,
        "file": onnx_path.name,
        "model_name": meta.get("model_name", "unknown"),
        "version": meta.get("version", "unknown"),
        "sha256": file_sha256(onnx_path),
        "size_bytes": onnx_path.stat().st_size,
        **_onnx_summary(onnx_path),
        "input_hw": meta.get("input_hw"),
        "normalisation": {"mean": meta.get("mean", list(DEFAULT_MEAN)), "std": meta.get("std", list(DEFAULT_STD)),
                          "formula": "(rgb/255 - mean)/std, RGB order, NCHW float32"},
        "output": {"convention": "metric depth in metres along the optical axis, Nx1xHxW float32",
                   "min_depth_m": meta.get("min_depth"), "max_depth_m": meta.get("max_depth"),
                   "invalid": "the runtime sets NaN outside [min_depth, max_depth] (REP 118)"},
        "metrics": meta.get("metrics") or {},
        "params": None,
        "flops": None,
        "weights_sha256": meta.get("weights_sha256"),
        "quantization": meta.get("quantization", "none (fp32)"),
        "train_command": meta.get("train_command", "unknown"),
        "export_command": meta.get("export_command", "unknown"),
        "exporter": meta.get("exporter", "unknown"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit() or "unknown",
    }
    if meta.get("init"):
        card["init"] = meta["init"]
    if meta.get("blend"):
        card["blend"] = meta["blend"]
    card.update({key: value for key, value in dict(info or {}).items() if value is not None})
    write_text_atomic(onnx_path.with_suffix(".json"), json.dumps(card, indent=2, sort_keys=False, default=str) + "\n")
    return write_text_atomic(onnx_path.with_suffix(".md"), _card_markdown(card))


def update_model_card(onnx_path: str | os.PathLike, fields: Mapping[str, Any]) -> Path:
    """Add or replace ``fields`` in the card of a model (``<name>.json``) and rewrite its ``.md``; returns the .md.

    Everything else in the card (date, metrics, commands) is kept as it was.
    """
    onnx_path = Path(onnx_path)
    card_path = onnx_path.with_suffix(".json")
    if not card_path.is_file():
        raise ValueError(f"model card {str(card_path)!r} does not exist")
    card = json.loads(card_path.read_text())
    card.update(fields)
    write_text_atomic(card_path, json.dumps(card, indent=2, sort_keys=False, default=str) + "\n")
    return write_text_atomic(onnx_path.with_suffix(".md"), _card_markdown(card))


def remove_model_files(onnx_path: str | os.PathLike) -> list[Path]:
    """Delete a model and its card (``.onnx``, ``.md``, ``.json``) where present; returns what was removed."""
    onnx_path = Path(onnx_path)
    removed = []
    for path in (onnx_path, onnx_path.with_suffix(".md"), onnx_path.with_suffix(".json")):
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return "n/a" if value is None else str(value)


def _styles_markdown(styles: Mapping[str, Any]) -> list[str]:
    """The "Forest styles" section of a card: one row per style folder, held-out ones marked, and the worst."""
    held_out = set(styles.get("held_out") or ())
    lines = ["", "## Forest styles", "", str(styles.get("note") or ""), "",
             "| style | in training | frames | absrel | rmse | delta1 |", "|---|---|---:|---:|---:|---:|"]
    for row in styles.get("rows") or ():
        name = row["folder"]
        lines.append(f"| {name} | {'no (held out)' if name in held_out else 'yes (other seeds)'} | {row['frames']} "
                     f"| {_fmt(row['absrel'])} | {_fmt(row['rmse'])} | {_fmt(row['delta1'])} |")
    worst = styles.get("worst_held_out")
    if worst:
        lines.append(f"| **worst held-out: {worst['folder']}** | no | {worst['frames']} | {_fmt(worst['absrel'])} "
                     f"| {_fmt(worst['rmse'])} | {_fmt(worst['delta1'])} |")
    return lines


def _card_markdown(card: Mapping[str, Any]) -> str:
    norm, out = card["normalisation"], card["output"]
    lines = [
        f"# {card['name']} ({card['model_name']})",
        "",
        "| field | value |",
        "|---|---|",
        f"| version | `{card['version']}` |",
        f"| file | `{card['file']}`, {_fmt(card['size_bytes'])} bytes |",
        f"| sha256 | `{card['sha256']}` |",
        f"| ONNX opset | {card['opset']} |",
        f"| input | `{card['input_name']}` {card['input_shape']} (H x W = {card['input_hw']}), "
        f"RGB, {norm['formula']} |",
        f"| mean / std | {norm['mean']} / {norm['std']} |",
        f"| output | `{card['output_name']}`: {out['convention']} |",
        f"| depth range | {_fmt(out['min_depth_m'])} - {_fmt(out['max_depth_m'])} m; {out['invalid']} |",
        f"| params | {_fmt(card['params'])} |",
        f"| FLOPs (2 x MACs, one frame) | {_fmt(card['flops'])} |",
        f"| quantization | {card['quantization']} |",
        f"| trained with | `{card['train_command']}` |",
        f"| exported with | `{card['export_command']}` ({card['exporter']}) |",
        f"| date | {card['date']} |",
        f"| git commit | `{card['git_commit']}` |",
        "",
        "## Metrics",
        "",
    ]
    metrics = card.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    else:
        lines.append("No evaluation metrics recorded (untrained or not evaluated).")
    if card.get("init"):
        lines += ["", "## Fine-tuned from", "", "| field | value |", "|---|---|"]
        lines += [f"| {key} | `{_fmt(value)}` |" for key, value in card["init"].items()]
    if card.get("blend"):
        lines += ["", "## Blended from (forest-train blend)", "", "| weight | source | sha256 |", "|---:|---|---|"]
        lines += [f"| {_fmt(b.get('weight'))} | `{b.get('source')}` | `{b.get('sha256')}` |" for b in card["blend"]]
    if card.get("checkpoint"):
        lines += ["", "## PyTorch checkpoint", "", "| field | value |", "|---|---|"]
        for key, value in card["checkpoint"].items():
            if key == "size_bytes":
                lines.append(f"| size | {_fmt(value)} bytes |")
            else:
                label = f"{key[:-2]} (m)" if key.endswith("_m") else key
                lines.append(f"| {label.replace('_', ' ')} | `{_fmt(value)}` |")
    if card.get("styles"):
        lines += _styles_markdown(card["styles"])
    if card.get("int8"):
        lines += ["", "## int8 vs fp32", "", "```json", json.dumps(card["int8"], indent=2, default=str), "```"]
    if card.get("notes"):
        lines += ["", "## Notes", "", str(card["notes"])]
    return "\n".join(lines) + "\n"
