"""Deployment of the Flower apps: certificates and keys (:mod:`.certs`), a SuperLink and SuperNodes (:mod:`.local`).

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
from forest_perception.collab.deploy.local import DeployResult, DeploySpec, LocalDeployment, RoverNode

__all__ = [
    "DEFAULT_HOSTS",
    "DeployResult",
    "DeploySpec",
    "DeploymentCerts",
    "LocalDeployment",
    "RoverKeys",
    "RoverNode",
    "check_deployment_certs",
    "load_deployment_certs",
    "make_deployment_certs",
]
