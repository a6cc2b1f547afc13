"""Export a generated forest to Gazebo (Harmonic, gz-sim 8) with a ros_gz_bridge config.

One job a module: ``sdf`` (SDFormat element helpers), ``bridge`` (contract topics <-> Gazebo topics,
bridge.yaml), ``rover_model`` (the rover's model and sensors, start poses), ``world_export`` (world.sdf,
terrain meshes, ``export_gazebo``). The public names of the former single module are all importable from here.
Details: docs/simulator.md.
"""

from forest_perception.geo import rotation_from_rpy
from forest_perception.geo import rpy_from_rotation as rpy_from_matrix  # the name this module always exported
from forest_perception.sim.gazebo.bridge import (
    BRIDGED_TOPICS,
    CAMERA_GZ_TOPIC,
    GZ_TO_ROS,
    ROS_TO_GZ,
    BridgedTopic,
    bridge_entries,
    bridge_yaml,
    gz_topic,
)
from forest_perception.sim.gazebo.rover_model import (
    CASTER_RADIUS_M,
    COLOR_FAR_M,
    COLOR_NEAR_M,
    DEPTH_FAR_M,
    DEPTH_NEAR_M,
    GPS_HORIZONTAL_STDDEV_M,
    GPS_VELOCITY_STDDEV_MPS,
    GPS_VERTICAL_STDDEV_M,
    IMU_ACCEL_STDDEV,
    IMU_GYRO_STDDEV,
    MAX_SENSOR_RATE_HZ,
    SPAWN_DROP_M,
    WHEEL_MASS_KG,
    WHEEL_WIDTH_M,
    spawn_poses,
)
from forest_perception.sim.gazebo.sdf import PHYSICS_STEP_S, SDF_VERSION
from forest_perception.sim.gazebo.world_export import (
    BRIDGE_YAML_NAME,
    COLLISION_MAX_CELLS,
    DEFAULT_WEATHER,
    TERRAIN_COLLISION_MESH_NAME,
    TERRAIN_MESH_NAME,
    TRUNK_SINK_M,
    WORLD_SDF_NAME,
    GazeboExport,
    collision_terrain,
    export_gazebo,
    resolve_weather,
    world_name,
    world_sdf,
)

__all__ = [
    "BRIDGED_TOPICS", "BRIDGE_YAML_NAME", "BridgedTopic", "CAMERA_GZ_TOPIC", "CASTER_RADIUS_M", "COLLISION_MAX_CELLS",
    "COLOR_FAR_M", "COLOR_NEAR_M", "DEFAULT_WEATHER", "DEPTH_FAR_M", "DEPTH_NEAR_M", "GPS_HORIZONTAL_STDDEV_M",
    "GPS_VELOCITY_STDDEV_MPS", "GPS_VERTICAL_STDDEV_M", "GZ_TO_ROS", "GazeboExport", "IMU_ACCEL_STDDEV",
    "IMU_GYRO_STDDEV", "MAX_SENSOR_RATE_HZ", "PHYSICS_STEP_S", "ROS_TO_GZ", "SDF_VERSION", "SPAWN_DROP_M",
    "TERRAIN_COLLISION_MESH_NAME", "TERRAIN_MESH_NAME", "TRUNK_SINK_M", "WHEEL_MASS_KG", "WHEEL_WIDTH_M",
    "WORLD_SDF_NAME", "bridge_entries", "bridge_yaml", "collision_terrain", "export_gazebo", "gz_topic",
    "resolve_weather", "rotation_from_rpy", "rpy_from_matrix", "spawn_poses", "world_name", "world_sdf",
]
