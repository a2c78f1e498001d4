"""Code shared by facetron's Triton python-backend models (runs inside the
python backend stub, where ``triton_python_backend_utils`` is importable)."""
