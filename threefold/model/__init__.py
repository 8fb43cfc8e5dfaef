"""The transformer: Llama and GPT-2 flavours (transformer), the fused output layer and vocabulary-parallel
loss (loss), and Hugging Face names, configs and safetensors (hf)."""
