"""Depth networks, training, export and shipped weights."""
