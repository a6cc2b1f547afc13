"""The cloud side of the swarm: the Flower SuperLink (TLS, SuperNode authentication, every rover key of the
certificate folder registered) and the model release server, both on this machine.

ros2 launch forest_perception cloud.launch.py certs:=certs registry:=runs/registry
ros2 launch forest_perception cloud.launch.py host:=10.0.0.5 superlink_port:=9092 release_port:=8470

Make the certificates first (``forest-fl certs --out certs --rover rover_0 --rover rover_1 ...``; with ``--host``
for the address the rovers dial) and a release (``forest-fl release create ... --registry runs/registry``). Each
rover's collab_node then runs its own SuperNode (``supernode:=true``) against ``superlink_port`` and follows the
release server (``model_source:=https://HOST:release_port``); ``launch/swarm_sim.launch.py`` does all of it in
simulation. Submit federated runs with the ``flwr run`` line the deploy process prints (docs/federated.md); promote
releases with ``forest-fl release promote`` (docs/releases.md).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.substitutions import FindPackagePrefix


def generate_launch_description() -> LaunchDescription:
    forest_fl = PathJoinSubstitution([FindPackagePrefix("forest_perception"), "lib", "forest_perception", "forest-fl"])
    return LaunchDescription(
        [
            DeclareLaunchArgument("certs", default_value="certs", description="`forest-fl certs` folder"),
            DeclareLaunchArgument("run_dir", default_value="runs/cloud",
                                  description="SuperLink logs, Flower homes, coordinator.db, nodes.json"),
            DeclareLaunchArgument("registry", default_value="runs/registry", description="release registry folder"),
            DeclareLaunchArgument("host", default_value="127.0.0.1", description="address both servers bind"),
            DeclareLaunchArgument("superlink_port", default_value="9092", description="SuperLink Fleet API port"),
            DeclareLaunchArgument("release_port", default_value="8470", description="release server port"),
            ExecuteProcess(
                name="superlink",
                cmd=[forest_fl, "deploy", "--coordinator-only", "--certs", LaunchConfiguration("certs"),
                     "--run-dir", LaunchConfiguration("run_dir"), "--host", LaunchConfiguration("host"),
                     "--port", LaunchConfiguration("superlink_port")],
                output="screen",
            ),
            ExecuteProcess(
                name="release_server",
                cmd=[forest_fl, "release", "serve", "--registry", LaunchConfiguration("registry"),
                     "--certs", LaunchConfiguration("certs"), "--host", LaunchConfiguration("host"),
                     "--port", LaunchConfiguration("release_port")],
                output="screen",
            ),
        ]
    )
