"""Token data: preparation from text (prepare, tokenizer) and memory-mapped token files read in
deterministic data-parallel batches (dataset)."""
