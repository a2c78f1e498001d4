"""facetron.client: gRPC client library for facetron's Triton models.

* :class:`FacetronClient` / :class:`AsyncFacetronClient` — one server
  (threads / asyncio), per-call timeouts, retries on UNAVAILABLE;
* :class:`ServerPool` / :class:`AsyncServerPool` — several servers:
  round-robin, failover, cool-down and re-probe of failed servers;
* ``infer(..., use_shm=True)`` — large tensors through system shared memory
  (server on this machine only; :mod:`facetron.client.shm`).

Server errors arrive as :mod:`facetron.errors` types with the server's
message: INVALID_ARGUMENT -> InvalidInputError, NOT_FOUND -> NotFoundError,
UNAVAILABLE / DEADLINE_EXCEEDED -> ServerError.

Layout: the plan both front ends share — ``requests`` (requests, results,
operations; names and limits from :mod:`facetron.contract`), ``tensors``
(numpy on the wire), ``errors`` (status -> error), ``retry`` (policy and
the one-server retry plan), ``failover`` (server health and the pool's
rounds), ``connection`` (urls, channel options), ``api`` (the model
methods) — and thin drivers over it: ``grpc_client`` / ``aio_client`` (one
server), ``pool`` (several), ``shm`` and ``stream`` (transports).
"""

from facetron.client.aio_client import AsyncFacetronClient
from facetron.client.connection import DEFAULT_URL, parse_servers
from facetron.client.grpc_client import FacetronClient
from facetron.client.pool import AsyncServerPool, ServerPool
from facetron.client.requests import Detections, PortraitResult, SelectResult
from facetron.client.retry import NO_RETRY, CallInfo, RetryPolicy

__all__ = [
    "DEFAULT_URL",
    "NO_RETRY",
    "AsyncFacetronClient",
    "AsyncServerPool",
    "CallInfo",
    "Detections",
    "FacetronClient",
    "PortraitResult",
    "RetryPolicy",
    "SelectResult",
    "ServerPool",
    "parse_servers",
]
