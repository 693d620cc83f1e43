"""Shared templates of the methods: scoring (score channels, prune to the budget),
layer-wise reconstruction (thinet, channel_regression) and learned widths (pfs, tas)."""
