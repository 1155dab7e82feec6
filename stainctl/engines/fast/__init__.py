"""The `fast` engine: a compact feed-forward generator that runs on a CPU."""
