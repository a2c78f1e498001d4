"""facetron.training: photos -> dataset -> identity LoRA."""
