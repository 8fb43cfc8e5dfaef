"""The transformer: Llama and GPT-2 flavours (transformer), the fused output layer and vocabulary-parallel
loss (loss), and Hugging Face names, configs and safetensors (hf)."""

CHUNK_ELEMENTS = 2**30
"""Most logits (tokens x local vocabulary) the output layer and loss materialize at once: 2 GiB in bf16
(llama-1b at b=4, s=2048 fits in one chunk: 8192 x 128256 elements). Here, free of torch, so that the
planner's memory model reads the same figure without loading torch."""
