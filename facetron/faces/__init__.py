"""facetron.faces: detector, embedder, alignment, quality, attributes, retouch."""
