"""``make demo``: a simulated forest and rover over ROS 2 on loopback, its recording a dataset, a swarm that learns.

One module per step (:mod:`.drive`, :mod:`.dataset`, :mod:`.federated`); :mod:`.main` runs them in
order and prints what each measured. Every step uses the package's public APIs and topics.
"""
