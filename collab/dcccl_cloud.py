"""DC-CCL on the cloud: distil the mimic from cloud folders, take the averaged small submodel out of the
coordinator's store, and export the two deployable models (rover: mimic + small; base station: large + small).

What ``forest-fl dcccl distil`` and ``forest-fl dcccl export`` run; the pure parts are in
:mod:`forest_perception.collab.dcccl`. Set-up and figures: ``docs/collaborative.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from forest_perception.collab import dcccl
from forest_perception.collab.dcccl import DcCclSpec, LargeSubmodel, Part, VersionMismatchError

LOG = logging.getLogger(__name__)


def cloud_frames(folders: Sequence[str | os.PathLike], large: LargeSubmodel, rover_hw: Sequence[int],
                 max_frames: int = 1200, batch_size: int = 8, cache: str | os.PathLike | None = None,
                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images at the rover's size, the large submodel's log depth on them)`` for up to ``max_frames`` frames.

    The same frames are read at both input sizes (as each network's preprocessing resizes them); the teacher runs
    once per frame, batched, and only its output is kept, so memory stays at the rover-size tensors.
    """
    from tqdm import tqdm

    from forest_perception.collab.rover.holdout import spread_indices
    from forest_perception.models.data import ForestDepthDataset

    sources = [Path(f) for f in folders]
    missing = [str(f) for f in sources if not f.is_dir()]
    if missing:
        raise ValueError(f"cloud data folder(s) {', '.join(missing)} do not exist")
    big = ForestDepthDataset(sources, input_hw=large.input_hw, cache=cache)
    small = ForestDepthDataset(sources, input_hw=rover_hw, cache=cache)
    if cache is not None:
        big.prepare_cache(progress=progress)
        small.prepare_cache(progress=progress)
    picks = spread_indices(len(big), max_frames)
    images, targets = [], []
    for first in tqdm(range(0, len(picks), batch_size), desc="teacher", disable=not progress, leave=False):
        idx = picks[first:first + batch_size]
        batch = torch.stack([big[i]["image"] for i in idx])
        targets.append(dcccl.log_depth_outputs(large.module, batch, rover_hw, batch_size))
        images.append(torch.stack([small[i]["image"] for i in idx]))
    return torch.cat(images), torch.cat(targets)


def distil_from_folders(spec: DcCclSpec, folders: Sequence[str | os.PathLike], out: str | os.PathLike,
                        epochs: int = 4, lr: float = 3e-4, max_frames: int = 1200, batch_size: int = 8,
                        seed: int = 0, cache: str | os.PathLike | None = None, progress: bool = True,
                        command: str = "") -> dict[str, Any]:
    """Build the large submodel and the mimic of ``spec``, distil on ``folders``, write the mimic part to ``out``.

    Also writes ``<out>.json`` (versions, losses, FLOPs, time). Returns that summary.
    """
    started = time.perf_counter()
    large = dcccl.build_large(spec)
    mimic = dcccl.build_mimic(spec, large)
    images, targets = cloud_frames(folders, large, mimic.input_hw, max_frames, batch_size, cache, progress)
    teacher_s = time.perf_counter() - started

    def report(epoch: int, loss: float) -> None:
        if progress:
            print(f"distil epoch {epoch}/{epochs}: mse(log depth) {loss:.5f}", flush=True)

    log_range = (math.log(spec.min_depth), math.log(spec.max_depth))
    start_version = mimic.version
    result = dcccl.distil(mimic, images, targets, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                          log_range=log_range, progress=report)
    mimic.large_version = large.version
    mimic.info.update({"distilled_from": large.version, "distil_frames": result.frames, "distil_epochs": epochs,
                       "distil_loss": result.epoch_loss, "distil_start_loss": result.start_loss,
                       "folders": [Path(f).name for f in folders], "command": command})
    path = dcccl.save_part(mimic, out, spec)
    small = dcccl.build_small(spec, mimic, seed)
    summary = {
        "mimic": str(path), "mimic_version": mimic.version, "mimic_start_version": start_version,
        "large_version": large.version, "large_sources": large.sources, "spec": asdict(spec),
        "frames": result.frames, "epochs": epochs, "lr": lr, "loss_start": result.start_loss,
        "loss_by_epoch": result.epoch_loss, "teacher_s": teacher_s, "distil_s": result.seconds,
        "flops": dcccl.flops_table(large, mimic, small, spec),
        "bytes": dcccl.round_bytes(large, mimic, small, 1, mimic_sent=True), "command": command,
    }
    Path(path).with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def small_from_store(db: str | os.PathLike, mimic: Part, server_round: int | None = None) -> Part:
    """The averaged small submodel of a dc-ccl run (its last round, or ``server_round``) as a part of ``mimic``.

    ``VersionMismatchError`` when the run trained with another mimic; ``ValueError`` when it is no dc-ccl run.
    """
    from forest_perception.collab.flower.store import CoordinatorStore

    with CoordinatorStore(Path(db), readonly=True) as store:
        identity = dict(store.identity or {})
        if identity.get("algorithm") != "dc-ccl":
            raise ValueError(f"coordinator store {db} holds a {identity.get('algorithm')!r} run, not dc-ccl")
        if identity.get("dcccl-mimic") != mimic.version:
            raise VersionMismatchError(f"coordinator store {db} trained with mimic {identity.get('dcccl-mimic')}, "
                                       f"not {mimic.version}")
        server_round = store.last_round() if server_round is None else int(server_round)
        names, params = store.model(server_round)
    prefix = "part."
    if not names or not all(n.startswith(prefix) for n in names):
        raise ValueError(f"coordinator store {db}: its tensors are not a small submodel's ({names[:2]}...)")
    channels = int(params[names.index("part.net.encoder.stage1.0.0.weight")].shape[0])
    small = dcccl.small_part_of(mimic, channels)
    state = small.module.state_dict()
    for name, value in zip(names, params):
        key = name[len(prefix):]
        if key not in state or tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"coordinator store {db}: tensor {name} does not fit a small submodel of {channels} "
                             "channels")
        state[key] = torch.as_tensor(value).to(state[key].dtype)
    small.module.load_state_dict(state)
    small.info["from_store"] = {"db": Path(db).name, "round": server_round}
    return small


def drop_cloud_model(onnx_path: str | os.PathLike, drop_dir: str | os.PathLike, server_round: int | None = None,
                     ) -> Path:
    """Copy the cloud model into a base station's drop folder as ``global-r<round>.onnx`` (atomically, card beside).

    Its collab_node gates it on the base station's held-out segments like any global model. ``server_round``
    defaults to one after the newest model already there.
    """
    import shutil

    from forest_perception.collab.rover.models import DROP_PATTERN, global_model_name

    drop = Path(drop_dir)
    drop.mkdir(parents=True, exist_ok=True)
    if server_round is None:
        rounds = [int(m.group(1)) for p in drop.iterdir() if (m := DROP_PATTERN.match(p.name))]
        server_round = max(rounds, default=0) + 1
    final = drop / global_model_name(int(server_round), "onnx")
    staged = drop / f".{final.name}.{os.getpid()}.tmp"
    try:
        shutil.copyfile(onnx_path, staged)
        os.replace(staged, final)
    finally:
        staged.unlink(missing_ok=True)
    return final


def export_deployables(spec: DcCclSpec, mimic: Part, small: Part, out_dir: str | os.PathLike,
                       large: LargeSubmodel | None = None, command: str = "") -> dict[str, Path]:
    """Export the rover model (mimic + small) and the base-station model (large + small) with model cards.

    Parts of another large model or mimic are refused by name (:class:`VersionMismatchError`). Returns
    ``{"rover": onnx, "cloud": onnx}``.
    """
    from forest_perception.models.cards import update_model_card
    from forest_perception.models.export import export_onnx, write_model_card
    from forest_perception.models.networks import count_flops, count_parameters

    large = large or dcccl.build_large(spec)
    dcccl.check_pair(mimic, small, large.version)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {
        "rover": (dcccl.rover_model(mimic, small, spec), mimic.input_hw),
        "cloud": (dcccl.cloud_model(large, small, spec), large.input_hw),
    }
    versions = {"large": large.version, "mimic": mimic.version, "small": small.version}
    written = {}
    for kind, (model, hw) in models.items():
        name = f"dcccl_{kind}_{hw[1]}x{hw[0]}"
        meta = {"model_name": f"dcccl_{kind}", "command": command or "forest-fl dcccl export", "dcccl": versions}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export_onnx((model, meta), out_dir / f"{name}.onnx", input_hw=hw, export_command=command or None)
        write_model_card(path, {"params": count_parameters(model), "flops": count_flops(model, hw)})
        update_model_card(path, {"dcccl": {
            "kind": kind, "versions": versions, "parts": "mimic + small (one graph)" if kind == "rover"
            else "large + small (the small submodel runs on the image resized to the rover's input)",
            "large_sources": large.sources, "mimic_info": mimic.info, "small_info": small.info}})
        written[kind] = path
    return written
