"""Checkpoints: the native format of one layout with its manager (native), DeepSpeed's optimizer wrappers
read and written parameter by parameter (optimizer), the layout-free universal format (universal),
and a checkpoint's weights without an engine (weights). Conversion between layouts rebuilds the training
engine, so it lives a floor up, in fwl_scale/train/checkpoint_convert.py.
Atomic writes come from fwl_scale/atomic.py."""
