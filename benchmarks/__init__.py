"""facetron.benchmarks: latency/throughput harness and reports."""
