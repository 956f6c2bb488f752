"""The network: layers, RoPE, DINO, the aggregator, the heads and the StreamVGGT model."""
