"""Ray Serve scale-out for `star-run serve`: every model replica runs one `star-run serve` child
on a free loopback port; a thin ingress relays the OpenAI images API, /v1/models, the health
routes and KServe v2 to them through a DeploymentHandle, with seeds, retries and backpressure.

Start: `serve run star_ray:app model=DIR num_replicas=2` (with deploy/ray on PYTHONPATH), a Serve
config file (serve-config.yaml), or deploy/ray/run-local.sh. See deploy/ray/README.md.
"""

from .builder import app, parse_args

__all__ = ["app", "parse_args"]
