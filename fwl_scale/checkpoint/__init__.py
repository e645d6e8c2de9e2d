"""Checkpoints: the native format of one layout with its manager (native), DeepSpeed's optimizer wrappers
read and written parameter by parameter (optimizer), the layout-free universal format (universal),
conversion and consolidation (convert), and a checkpoint's weights without an engine (weights).
Atomic writes come from fwl_scale/atomic.py."""
