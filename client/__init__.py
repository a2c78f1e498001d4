"""facetron.client: gRPC client library for facetron's Triton models."""

from facetron.client.grpc_client import DEFAULT_URL, FacetronClient

__all__ = ["DEFAULT_URL", "FacetronClient"]
