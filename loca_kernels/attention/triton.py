"""Placeholder replaced by the Triton attention kernels."""
