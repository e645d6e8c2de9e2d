"""fwl_scale: distributed training of language models with Fast Weight Layers."""

__version__ = "0.1.0"

IGNORE_INDEX = -100
