"""Writing and checking draft directories that SGLang and vLLM load."""
