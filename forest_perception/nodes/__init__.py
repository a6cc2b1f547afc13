"""ROS 2 nodes: thin wrappers over the pure cores."""
