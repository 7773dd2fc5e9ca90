"""Speed comparisons against PyTorch (need ``torch``)."""
