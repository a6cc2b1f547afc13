"""Recorded topics: the :class:`TopicSpec` of each, with its message definition and type hash.

Definitions and RIHS01 hashes come from the rosbags ROS 2 Kilted typestore unless the caller gives
them (capture_node passes the hash its publishers announce). Details: docs/runtime.md
(`forest_perception.recorder`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

_TYPESTORE = None
_TYPESTORE_LOCK = threading.Lock()


def typestore() -> Any:
    """The rosbags ROS 2 Kilted typestore (loaded once): message definitions and RIHS01 type hashes."""
    global _TYPESTORE
    with _TYPESTORE_LOCK:
        if _TYPESTORE is None:
            from rosbags.typesys import Stores, get_typestore

            _TYPESTORE = get_typestore(Stores.ROS2_KILTED)
        return _TYPESTORE


def message_definition(type_name: str) -> tuple[str, str]:
    """(full concatenated ``ros2msg`` definition, RIHS01 type hash) of a message type from the typestore."""
    store = typestore()
    if type_name not in store.fielddefs:
        raise ValueError(
            f"message type {type_name!r} is not in the rosbags ROS 2 Kilted typestore: "
            "pass msgdef= and type_hash= to add_topic"
        )
    msgdef, _ = store.generate_msgdef(type_name, ros_version=2)
    return msgdef, store.hash_rihs01(type_name)


@dataclass(frozen=True)
class TopicSpec:
    """A recorded topic: absolute name, ROS type, message definition, type hash and offered QoS profiles."""

    name: str
    type_name: str
    msgdef: str
    type_hash: str = ""
    qos_profiles: tuple[dict[str, Any], ...] = ()
    serialization_format: str = "cdr"
    msgdef_encoding: str = "ros2msg"

    def metadata_entry(self, message_count: int) -> dict[str, Any]:
        """This topic's entry of ``topics_with_message_count`` in metadata.yaml."""
        return {
            "topic_metadata": {
                "name": self.name,
                "type": self.type_name,
                "serialization_format": self.serialization_format,
                "offered_qos_profiles": [dict(p) for p in self.qos_profiles],
                "type_description_hash": self.type_hash,
            },
            "message_count": int(message_count),
        }
