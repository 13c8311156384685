"""Training Paint by Example: data, the loss of one step, the loop, and its distributed plumbing."""
