"""The processing library: generation, template preparation, selection,
fusion, the portrait path, the runtime-LoRA bank and the served nets' input
rules. Triton-free (runtimes are passed in as callables), so training,
export, benchmarks and the served models all call the same code."""
