"""gRPC KV store for encoded KV chunks, with RAM, disk and Redis tiers."""
