"""Experiments that check the seed papers' claims on the forest depth task with our Flower stack.

One script per claim (``fedlaavg_vs_fedavg``, ``fedsubavg_sparse``, ``semicyclic``, ``fed_vs_local_vs_central``),
shared pieces by job (:mod:`.heldout`, :mod:`.federated`, :mod:`.report`, :mod:`.cli`), and ``run_all`` that runs
them and writes ``experiments/results/``. Run from the repository root: ``python -m experiments.run_all``.
See ``docs/experiments.md``.
"""
