"""Model releases to the swarm: a signed, content-addressed registry beside the coordinator, targeting policies
with staged canary rollouts, an HTTPS server the rovers pull from, and the rover's pull-verify-install client.

See ``docs/releases.md``.
"""
