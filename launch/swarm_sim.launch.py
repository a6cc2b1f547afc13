"""The whole swarm in simulation: N rovers in one simulated forest, each with depth, sync, capture and collab
nodes, and (``coordinator:=true``) the cloud side of cloud.launch.py.

ros2 launch forest_perception swarm_sim.launch.py rovers:=3 style:=clustered_regrowth
ros2 launch forest_perception swarm_sim.launch.py rovers:=5 coordinator:=false supernode:=false

sim_node drives ``rover_0`` .. ``rover_<N-1>`` (config/sim.yaml) and publishes ``/clock``; every rover node runs
under its rover's namespace on simulated time with config/rover.yaml. capture_node records each rover into
``bag_dir/<rover>``: with ``triggers:=true`` (the default) only the frames the rover's trigger_node marks.
collab_node follows the release server (``https://127.0.0.1:release_port``, models signed with
``registry/release_signing.pub``), gates on ``data_dir/<rover>`` (the rover's curated recordings) and keeps its
models in ``models_dir/<rover>``; with ``supernode:=true`` it also runs the rover's Flower SuperNode with its key from
``certs/rovers/<rover>/``. First make the certificates for every rover and the registry's signing key:
``forest-fl certs --out certs --rover rover_0 --rover rover_1 --rover rover_2`` and
``forest-fl release init --registry runs/registry``.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _swarm(context, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - OpaqueFunction's signature
    """sim_node and the nodes of every rover, from the launch arguments as given."""
    arg = context.launch_configurations
    count = int(arg["rovers"])
    if not 1 <= count <= 64:
        raise ValueError(f"rovers must be 1..64, got {count}")
    names = [f"rover_{i}" for i in range(count)]
    truth = {"true": True, "false": False}
    record, collab, supernode, triggers = (truth[arg[k].lower()] for k in ("record", "collab", "supernode",
                                                                          "triggers"))
    actions = [
        Node(
            package="forest_perception",
            executable="sim_node",
            name="sim_node",
            output="screen",
            parameters=[arg["sim_params_file"],
                        {"rover_names": names, "seed": int(arg["seed"]), "style": arg["style"]}],
        )
    ]
    for rover in names:
        actions += [
            Node(
                package="forest_perception",
                executable="depth_node",
                name="depth_node",
                namespace=rover,
                output="screen",
                parameters=[arg["params_file"], {"model_path": arg["model_path"], "use_sim_time": True}],
            ),
            Node(
                package="forest_perception",
                executable="sensor_sync_node",
                name="sensor_sync_node",
                namespace=rover,
                output="screen",
                parameters=[arg["params_file"], {"use_sim_time": True}],
            ),
        ]
        if record:
            actions.append(
                Node(
                    package="forest_perception",
                    executable="capture_node",
                    name="capture_node",
                    namespace=rover,
                    output="screen",
                    parameters=[arg["params_file"], {"output_dir": os.path.join(arg["bag_dir"], rover),
                                                     "record_mode": "marked" if triggers else "all",
                                                     "use_sim_time": True}],
                )
            )
            if triggers:  # keep at the source only the frames worth training on
                actions.append(
                    Node(
                        package="forest_perception",
                        executable="trigger_node",
                        name="trigger_node",
                        namespace=rover,
                        output="screen",
                        parameters=[arg["params_file"], {"use_sim_time": True}],
                    )
                )
        if collab:
            certs = arg["certs"]
            actions.append(
                Node(
                    package="forest_perception",
                    executable="collab_node",
                    name="collab_node",
                    namespace=rover,
                    output="screen",
                    parameters=[
                        arg["params_file"],
                        {
                            "model_source": f"https://127.0.0.1:{arg['release_port']}",
                            "release_public_key": os.path.join(arg["registry"], "release_signing.pub"),
                            "root_certificates": os.path.join(certs, "ca.crt"),
                            "auth_private_key": os.path.join(certs, "rovers", rover, "auth.key"),
                            "dataset_dir": os.path.join(arg["data_dir"], rover),
                            "models_dir": os.path.join(arg["models_dir"], rover),
                            "rover_id": rover,
                            "supernode": supernode,
                            "superlink_address": f"127.0.0.1:{arg['superlink_port']}",
                            "use_sim_time": True,
                        },
                    ],
                )
            )
    return actions


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("forest_perception")
    return LaunchDescription(
        [
            DeclareLaunchArgument("rovers", default_value="3", description="number of rovers (rover_0 ..)"),
            DeclareLaunchArgument("seed", default_value="0", description="forest seed"),
            DeclareLaunchArgument("style", default_value="none", description="forest style (docs/simulator.md)"),
            DeclareLaunchArgument("model_path", default_value="",
                                  description="depth_node's model; empty: the shipped model that fits the camera"),
            DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "rover.yaml"),
                                  description="parameter YAML of every rover's nodes"),
            DeclareLaunchArgument("sim_params_file", default_value=os.path.join(share, "config", "sim.yaml"),
                                  description="sim_node parameter YAML"),
            DeclareLaunchArgument("record", default_value="true", description="run capture_node on every rover"),
            DeclareLaunchArgument("bag_dir", default_value="bags",
                                  description="capture_node records into <dir>/<rover>"),
            DeclareLaunchArgument("triggers", default_value="true",
                                  description="with record: trigger_node marks the frames worth keeping and "
                                              "capture_node records only those (record_mode marked)"),
            DeclareLaunchArgument("collab", default_value="true", description="run collab_node on every rover"),
            DeclareLaunchArgument("supernode", default_value="true",
                                  description="collab_node runs the rover's Flower SuperNode"),
            DeclareLaunchArgument("data_dir", default_value="data/swarm",
                                  description="each rover's curated dataset folder is <dir>/<rover> (the gate's)"),
            DeclareLaunchArgument("models_dir", default_value="runs/swarm/models",
                                  description="collab_node's models, releases and ledger under <dir>/<rover>"),
            DeclareLaunchArgument("coordinator", default_value="true",
                                  description="also start the SuperLink and the release server (cloud.launch.py)"),
            DeclareLaunchArgument("certs", default_value="certs", description="`forest-fl certs` folder"),
            DeclareLaunchArgument("registry", default_value="runs/registry", description="release registry folder"),
            DeclareLaunchArgument("superlink_port", default_value="9092", description="SuperLink Fleet API port"),
            DeclareLaunchArgument("release_port", default_value="8470", description="release server port"),
            IncludeLaunchDescription(
                PythonLaunchDescriptionSource(os.path.join(share, "launch", "cloud.launch.py")),
                condition=IfCondition(LaunchConfiguration("coordinator")),
                launch_arguments={
                    "certs": LaunchConfiguration("certs"),
                    "registry": LaunchConfiguration("registry"),
                    "superlink_port": LaunchConfiguration("superlink_port"),
                    "release_port": LaunchConfiguration("release_port"),
                }.items(),
            ),
            OpaqueFunction(function=_swarm),
        ]
    )
