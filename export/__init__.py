"""facetron.export: LoRA merge, ONNX/TensorRT export, Triton repository assembly."""
