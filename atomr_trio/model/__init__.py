"""The model: config, weight files (GGUF, HF), the Llama-family decoder and paged attention."""
