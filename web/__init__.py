"""facetron.web: the web app for people (Gradio) over the gRPC API.

Upload photos -> prepare report with the contact sheet -> training with a
live progress bar -> style and options -> generation with per-step progress
(``portrait_stream``) -> gallery with similarities, seeds and a download.

It talks to Triton only through :mod:`facetron.client`; preparing and
training run as subprocesses of the ``facetron train`` CLI
(:mod:`facetron.web.stages`), so no model code loads into the web process.
Layer rule (tests/import_graph.py): facetron.web imports facetron.client,
facetron.contract, facetron.errors and facetron.imageio (uploads are checked
with the same image rules as ``facetron train prepare``), nothing else of
facetron. Start it with ``facetron web --server host:port``.
"""
