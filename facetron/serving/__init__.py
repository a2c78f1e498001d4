"""Thin Triton adapters: one module per served model, named like the model,
each holding that model's ``TritonPythonModel`` class (initialize / execute /
finalize). Imported only by ``model_repository/<model>/1/model.py`` and tests;
the processing they call lives in :mod:`facetron.pipeline`, the Triton glue in
:mod:`facetron.triton`."""
