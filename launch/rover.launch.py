"""A rover's perception: depth, sensor sync and (optionally) recording under the rover namespace.

ros2 launch forest_perception rover.launch.py                     # the shipped model that fits the camera
ros2 launch forest_perception rover.launch.py model_path:=/path/to/depth.onnx
ros2 launch forest_perception rover.launch.py sim:=true namespace:=rover_0 record:=true bag_dir:=/data/bags

depth_node subscribes ``/<namespace>/camera/image_raw`` and ``camera/camera_info`` and publishes
``depth/image``, ``depth/points``, ``depth/scan`` (frame ``camera_link``) and ``/diagnostics``.
sensor_sync_node matches colour, depth and camera_info, interpolates IMU and wheels to each frame
and publishes ``sync/*``, ``odom/fused`` and ``gps/enu``. With ``record:=true`` capture_node records
the rover's sensor topics into an MCAP rosbag2 bag under ``bag_dir`` (services
``capture_node/start|stop|pause|split``); with ``triggers:=true`` as well, trigger_node decides which
camera frames are worth keeping for training (sharpness, novelty, predicted vs measured depth, GPS spacing)
and capture_node records only those frame sets (``record_mode`` marked). With ``collab:=true`` collab_node
validates the global models the rover's Flower SuperNode drops into ``model_drop_dir`` on the rover's
held-out frames and hot-swaps depth_node's model when it is no worse. With ``sim:=true`` sim_node
(config/sim.yaml) drives one rover named after the namespace and publishes ``/clock``, and every node runs
on simulated time.
With an empty ``model_path`` (the default) depth_node runs the shipped model that fits the camera
(``model_family``); with an invalid one it still starts and reports the error on /diagnostics until
the parameter is set. Parameters of every node: ``params_file`` (config/rover.yaml).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("forest_perception")
    namespace = LaunchConfiguration("namespace")
    sim = LaunchConfiguration("sim")
    return LaunchDescription(
        [
            DeclareLaunchArgument("namespace", default_value="rover_0", description="rover namespace"),
            DeclareLaunchArgument(
                "model_path",
                default_value="",
                description="exported depth model (.onnx or .pt) or shipped model name for depth_node; empty: the "
                "shipped model that fits the camera",
            ),
            DeclareLaunchArgument(
                "model_family",
                default_value="auto",
                description="with an empty model_path: auto, multiscale or autoencoder",
            ),
            DeclareLaunchArgument(
                "params_file",
                default_value=os.path.join(share, "config", "rover.yaml"),
                description="parameter YAML of the rover's nodes",
            ),
            DeclareLaunchArgument("sim", default_value="false", description="also run sim_node (true/false)"),
            DeclareLaunchArgument("sync", default_value="true", description="run sensor_sync_node (true/false)"),
            DeclareLaunchArgument("record", default_value="false", description="run capture_node (true/false)"),
            DeclareLaunchArgument(
                "triggers",
                default_value="false",
                description="with record: run trigger_node and record only the frames it keeps (true/false)",
            ),
            DeclareLaunchArgument("bag_dir", default_value="bags", description="folder capture_node records into"),
            DeclareLaunchArgument("collab", default_value="false", description="run collab_node (true/false)"),
            DeclareLaunchArgument(
                "model_drop_dir",
                default_value="models/incoming",
                description="folder the rover's Flower SuperNode drops global models into (collab_node)",
            ),
            DeclareLaunchArgument(
                "sim_params_file",
                default_value=os.path.join(share, "config", "sim.yaml"),
                description="sim_node parameter YAML",
            ),
            Node(
                package="forest_perception",
                executable="depth_node",
                name="depth_node",
                namespace=namespace,
                output="screen",
                parameters=[
                    LaunchConfiguration("params_file"),
                    {
                        "model_path": LaunchConfiguration("model_path"),
                        "model_family": LaunchConfiguration("model_family"),
                        # launch_ros evaluates "true"/"false" as YAML booleans: simulated time with the simulator
                        "use_sim_time": sim,
                    },
                ],
            ),
            Node(
                package="forest_perception",
                executable="sensor_sync_node",
                name="sensor_sync_node",
                namespace=namespace,
                output="screen",
                condition=IfCondition(LaunchConfiguration("sync")),
                parameters=[LaunchConfiguration("params_file"), {"use_sim_time": sim}],
            ),
            Node(
                package="forest_perception",
                executable="capture_node",
                name="capture_node",
                namespace=namespace,
                output="screen",
                condition=IfCondition(LaunchConfiguration("record")),
                parameters=[
                    LaunchConfiguration("params_file"),
                    {
                        "output_dir": LaunchConfiguration("bag_dir"),
                        "use_sim_time": sim,
                        "record_mode": PythonExpression(
                            ["'marked' if '", LaunchConfiguration("triggers"), "'.lower() == 'true' else 'all'"]
                        ),
                    },
                ],
            ),
            Node(
                package="forest_perception",
                executable="trigger_node",
                name="trigger_node",
                namespace=namespace,
                output="screen",
                condition=IfCondition(
                    PythonExpression(
                        ["'", LaunchConfiguration("record"), "'.lower() == 'true' and '",
                         LaunchConfiguration("triggers"), "'.lower() == 'true'"]
                    )
                ),
                parameters=[LaunchConfiguration("params_file"), {"use_sim_time": sim}],
            ),
            Node(
                package="forest_perception",
                executable="collab_node",
                name="collab_node",
                namespace=namespace,
                output="screen",
                condition=IfCondition(LaunchConfiguration("collab")),
                parameters=[
                    LaunchConfiguration("params_file"),
                    {"model_source": LaunchConfiguration("model_drop_dir"), "use_sim_time": sim},
                ],
            ),
            Node(
                package="forest_perception",
                executable="sim_node",
                name="sim_node",
                output="screen",
                condition=IfCondition(sim),
                parameters=[LaunchConfiguration("sim_params_file"), {"rover_names": [namespace]}],
            ),
        ]
    )
