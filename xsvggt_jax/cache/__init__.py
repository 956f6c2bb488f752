"""The streaming K/V cache: the cache pytree, codecs, bit packing and pruning policies."""
