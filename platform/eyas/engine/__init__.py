"""The eyas inference engine: plain PyTorch Llama-family target, EAGLE-3 tree speculation,
continuous batching."""
