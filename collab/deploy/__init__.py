"""Deployment of the Flower apps: certificates and keys (:mod:`.certs`), how a rover's SuperNode is started
(:mod:`.supernode`), the processes it runs as (:mod:`.processes`); :mod:`.local` runs a whole deployment
(SuperLink and SuperNodes) on this machine.

See ``docs/federated.md``, section "Deployment on loopback (TLS + SuperNode authentication)".
"""

from forest_perception.collab.deploy.certs import (
    DEFAULT_HOSTS,
    DeploymentCerts,
    RoverKeys,
    check_deployment_certs,
    load_deployment_certs,
    make_deployment_certs,
)
from forest_perception.collab.deploy.supernode import RoverNode

__all__ = [
    "DEFAULT_HOSTS",
    "DeploymentCerts",
    "RoverKeys",
    "RoverNode",
    "check_deployment_certs",
    "load_deployment_certs",
    "make_deployment_certs",
]
