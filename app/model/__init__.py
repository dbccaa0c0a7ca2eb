"""The model: device, loading and merging, the slot KV cache, the decoding step, the engine and its scheduler."""
