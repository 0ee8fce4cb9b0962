"""A²ATS-style retrieval: query-aware vector-quantized key codes and top-k token selection."""
