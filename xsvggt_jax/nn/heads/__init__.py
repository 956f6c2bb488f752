"""Prediction heads: camera pose, DPT dense (depth / point map), point tracks."""
