"""Procedural forest simulator: world, renderer, rover, sensors (pure cores, no ROS)."""
