"""Run an exported forest in Gazebo (gz-sim 8) and bridge it onto the rover topic contract.

    forest-sim export-gazebo --out /tmp/forest --rovers 2
    ros2 launch forest_perception gazebo_sim.launch.py \\
        world_sdf:=/tmp/forest/world.sdf bridge_config:=/tmp/forest/bridge.yaml

Starts ``gz sim -r <world_sdf>`` through ros_gz_sim's gz_sim.launch.py (the whole launch
shuts down when Gazebo exits) and ros_gz_bridge's parameter_bridge with ``bridge_config``.
Nodes that consume the topics must run with ``use_sim_time:=true``.
"""

# launch.launch_description rather than the package root: ruff would take a bare "launch"
# for this repository's launch/ folder and sort it as first-party
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description import LaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    world_sdf = LaunchConfiguration("world_sdf")
    bridge_config = LaunchConfiguration("bridge_config")
    gz_sim = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(
            PathJoinSubstitution([FindPackageShare("ros_gz_sim"), "launch", "gz_sim.launch.py"])
        ),
        # -r: start running instead of paused, so sensors publish straight away
        launch_arguments={"gz_args": ["-r ", world_sdf], "on_exit_shutdown": "true"}.items(),
    )
    bridge = Node(
        package="ros_gz_bridge",
        executable="parameter_bridge",
        name="forest_gz_bridge",
        output="screen",
        parameters=[{"config_file": bridge_config, "use_sim_time": True}],
    )
    return LaunchDescription(
        [
            DeclareLaunchArgument("world_sdf", description="world.sdf written by forest-sim export-gazebo"),
            DeclareLaunchArgument("bridge_config", description="bridge.yaml written beside it"),
            gz_sim,
            bridge,
        ]
    )
