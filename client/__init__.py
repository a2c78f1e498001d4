"""facetron.client: gRPC client library for facetron's Triton models."""
