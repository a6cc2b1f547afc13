"""The rover's side of collaborative learning, without ROS: what collab_node does between federated rounds.

One module per job: global models from the drop folder (:mod:`.models`, :mod:`.sources`), the growing dataset
(:mod:`.dataset`), the held-out split (:mod:`.holdout`), the validation gate (:mod:`.gate`), local training
(:mod:`.training`), idleness (:mod:`.idle`), the deployment ledger (:mod:`.ledger`), and the node's job logic,
settings and status (:mod:`.agent`, :mod:`.settings`, :mod:`.status`). Torch, ONNX and ONNX Runtime are
imported only by the functions that need them. See ``docs/federated.md`` ("The rover's collab_node").
"""

from forest_perception.collab.rover.dataset import DatasetScan, DatasetWatcher, SegmentState, scan_recordings
from forest_perception.collab.rover.gate import (
    EXPORTERS,
    GATE_CODES,
    REFUSED_DIR,
    FrameScores,
    GateConfig,
    GateDecision,
    ValidationGate,
    build_network,
    compare_metrics,
    evaluate_engines,
    export_candidate,
    prune_accepted,
    score_engines,
    worse_by,
)
from forest_perception.collab.rover.holdout import (
    DEFAULT_HOLDOUT_FRACTION,
    HoldoutSet,
    holdout_split,
    make_holdout,
    rover_split,
    spread_indices,
)
from forest_perception.collab.rover.idle import IdleDetector, odometry_speed, train_permission
from forest_perception.collab.rover.ledger import CURRENT_ARRAYS_FILE, LEDGER_FILE, DeploymentLedger
from forest_perception.collab.rover.models import (
    DROP_FORMAT,
    DROP_PATTERN,
    TASK_META_KEYS,
    GlobalModel,
    global_model_name,
    list_global_models,
    read_candidate,
    read_global_model_file,
    task_from_meta,
    task_meta,
    write_global_model,
    write_global_model_file,
)
from forest_perception.collab.rover.sources import (
    CandidateRef,
    DropDirSource,
    ModelSource,
    StoreSource,
    open_model_source,
)
from forest_perception.collab.rover.training import LocalTraining, build_local_data, initial_model, train_locally

__all__ = [
    "CURRENT_ARRAYS_FILE",
    "DEFAULT_HOLDOUT_FRACTION",
    "DROP_FORMAT",
    "DROP_PATTERN",
    "EXPORTERS",
    "GATE_CODES",
    "LEDGER_FILE",
    "REFUSED_DIR",
    "TASK_META_KEYS",
    "CandidateRef",
    "DatasetScan",
    "DatasetWatcher",
    "DeploymentLedger",
    "DropDirSource",
    "FrameScores",
    "GateConfig",
    "GateDecision",
    "GlobalModel",
    "HoldoutSet",
    "IdleDetector",
    "LocalTraining",
    "ModelSource",
    "SegmentState",
    "StoreSource",
    "ValidationGate",
    "build_local_data",
    "build_network",
    "compare_metrics",
    "evaluate_engines",
    "export_candidate",
    "global_model_name",
    "holdout_split",
    "initial_model",
    "list_global_models",
    "make_holdout",
    "odometry_speed",
    "open_model_source",
    "prune_accepted",
    "read_candidate",
    "read_global_model_file",
    "rover_split",
    "scan_recordings",
    "score_engines",
    "spread_indices",
    "task_from_meta",
    "worse_by",
    "task_meta",
    "train_locally",
    "train_permission",
    "write_global_model",
    "write_global_model_file",
]
