"""What talks to Triton: python-backend helpers, BLS callables, request
batching, the generator host read once per model, and the ``tritonserver``
launcher (:mod:`facetron.triton.server`)."""
