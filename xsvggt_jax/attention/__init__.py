"""Attention: mask objects, kernels (dense, blocked, ring) and the dispatcher."""
