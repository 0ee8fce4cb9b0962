"""CacheGen-style KV codec: per-layer-group quantization, delta coding and rANS entropy coding."""
