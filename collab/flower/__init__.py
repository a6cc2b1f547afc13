"""Flower apps of the swarm: the cloud coordinator ServerApp, the rover ClientApp and their simulation.

- :mod:`collab.flower.strategies`: one Flower strategy per algorithm of :mod:`collab.algorithms`;
- :mod:`collab.flower.server_app`: the coordinator (resumable round loop, state in SQLite);
- :mod:`collab.flower.client_app`: the rover (local training of the depth network);
- :mod:`collab.flower.store`: the coordinator's SQLite store;
- :mod:`collab.flower.task`: model, local data, train and evaluate, run config defaults;
- :mod:`collab.flower.simulation`: virtual rover population and the Ray simulation runner;
- :mod:`collab.flower.cli`: the ``forest-fl`` command.

Importing this package imports nothing heavy; import the module you need.
"""
