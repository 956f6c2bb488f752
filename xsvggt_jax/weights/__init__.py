"""Weights: the torch-free checkpoint reader, the key map, conversion and params directories."""
