"""One-off tools (weight conversion)."""
