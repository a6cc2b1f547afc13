"""Experiments that check the seed papers' claims on the forest depth task with our Flower stack.

One script per claim (``fedlaavg_vs_fedavg``, ``fedsubavg_sparse``, ``semicyclic``,
``fed_vs_local_vs_central``), shared helpers in :mod:`experiments.common`, and ``run_all``
that runs them and writes ``experiments/results/``. See ``docs/experiments.md``.
"""
