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
"""

from facetron.client.aio_client import AsyncFacetronClient
from facetron.client.grpc_client import (
    DEFAULT_URL,
    NO_RETRY,
    CallInfo,
    Detections,
    FacetronClient,
    PortraitResult,
    RetryPolicy,
    SelectResult,
)
from facetron.client.pool import AsyncServerPool, ServerPool, parse_servers

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
