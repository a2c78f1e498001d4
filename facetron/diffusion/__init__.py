"""facetron.diffusion: base model specs (incl. the tiny default), tokenizer, scheduler glue."""
