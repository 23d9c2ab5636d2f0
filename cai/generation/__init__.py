"""Generation backends and the sampling stages (responses, on-policy pairs)."""
