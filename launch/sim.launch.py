"""Simulated forest with one or more rovers publishing the rover topic contract.

ros2 launch forest_perception sim.launch.py rovers:="[rover_0, rover_1]" weather:="[sunny, dusk]"
ros2 launch forest_perception sim.launch.py style:=hilly_deadwood seed:=4
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description() -> LaunchDescription:
    config = os.path.join(get_package_share_directory("forest_perception"), "config", "sim.yaml")
    return LaunchDescription(
        [
            DeclareLaunchArgument("params_file", default_value=config, description="sim_node parameter YAML"),
            DeclareLaunchArgument("seed", default_value="0", description="forest seed"),
            DeclareLaunchArgument("rovers", default_value="[rover_0]", description="rover namespaces"),
            DeclareLaunchArgument("weather", default_value="[auto]",
                                  description="weather preset(s); auto: overcast, or the style's own light"),
            DeclareLaunchArgument("style", default_value="none", description="forest style (docs/simulator.md)"),
            DeclareLaunchArgument("behaviour", default_value="explore", description="explore or cmd_vel"),
            Node(
                package="forest_perception",
                executable="sim_node",
                name="sim_node",
                output="screen",
                parameters=[
                    LaunchConfiguration("params_file"),
                    {
                        # launch_ros evaluates these strings as YAML: "0" -> int, "[a, b]" -> list
                        "seed": LaunchConfiguration("seed"),
                        "rover_names": LaunchConfiguration("rovers"),
                        "weather": LaunchConfiguration("weather"),
                        "style": LaunchConfiguration("style"),
                        "behaviour": LaunchConfiguration("behaviour"),
                    },
                ],
            ),
        ]
    )
