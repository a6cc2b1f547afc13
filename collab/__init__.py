"""Federated and device-cloud learning for the rover swarm."""
