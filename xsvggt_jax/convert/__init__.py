"""Upstream PyTorch checkpoint -> Flax parameter conversion (key map table + tensor transforms)."""

from .keymap import map_key
from .state_dict import ConversionError, convert_state_dict, check_coverage

__all__ = ["map_key", "convert_state_dict", "check_coverage", "ConversionError"]
