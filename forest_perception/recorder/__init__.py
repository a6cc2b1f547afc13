"""Record serialized ROS 2 messages into a rosbag2 bag with MCAP storage: the core of capture_node (no rclpy).

One job a module: ``qos`` (offered QoS profiles), ``topic_spec`` (recorded topics, typestore definitions),
``metadata`` (metadata.yaml), ``mcap_split`` (one MCAP file being written), ``bag_recorder`` (the threaded
``BagRecorder`` and its stats), ``gate`` (marked recording: only the frames marked on ``capture/mark`` and their
sensor context). The public names of the former single module are all importable from here.
Details: docs/runtime.md.
"""

from forest_perception.recorder.bag_recorder import (
    COMPRESSIONS,
    STATES,
    BagRecorder,
    DiskUsage,
    RecorderError,
    RecorderStats,
    TopicStats,
)
from forest_perception.recorder.gate import MARK_TOPIC, GateConfig, MarkGate, header_stamp_ns
from forest_perception.recorder.mcap_split import LIBRARY, MCAP_PROFILE, McapSplit
from forest_perception.recorder.metadata import (
    METADATA_VERSION,
    STORAGE_ID,
    FileRecord,
    bag_metadata,
    metadata_yaml,
    write_metadata,
)
from forest_perception.recorder.qos import (
    DURABILITY,
    HISTORY,
    LIVELINESS,
    RELIABILITY,
    adapted_subscription_qos,
    qos_profile,
    qos_yaml,
)
from forest_perception.recorder.topic_spec import TopicSpec, message_definition, typestore

__all__ = [
    "BagRecorder", "COMPRESSIONS", "DURABILITY", "DiskUsage", "FileRecord", "GateConfig", "HISTORY", "LIBRARY",
    "LIVELINESS", "MARK_TOPIC", "MCAP_PROFILE", "MarkGate", "METADATA_VERSION", "McapSplit", "RELIABILITY",
    "RecorderError", "RecorderStats", "STATES", "STORAGE_ID", "TopicSpec", "TopicStats", "adapted_subscription_qos",
    "bag_metadata", "header_stamp_ns", "message_definition", "metadata_yaml", "qos_profile", "qos_yaml", "typestore",
    "write_metadata",
]
