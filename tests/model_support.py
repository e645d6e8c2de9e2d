"""Shared pieces of the model-level parallel tests (tp, cp): parameters perturbed so that every term of
the FWL matters numerically, and the relative error measure."""
from __future__ import annotations

from contextlib import contextmanager

import torch

# Large, distinct step sizes: every fast term changes the outputs by far more than round-off.
STEP_SIZES = [0.9, 0.7, 0.8, 0.6, 0.5, 0.4]


def perturb(model, seed: int = 7) -> None:
    """Random biases, norms, alpha/beta and large distinct step sizes so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("step_sizes"):
                p.copy_(torch.tensor(STEP_SIZES, dtype=p.dtype))
            else:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.ndim == 1 else 0.05))


def worst(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a - ref).abs().max().item() / max(1.0, ref.abs().max().item())


@contextmanager
def body_probes(model):
    """Yields a dict that receives the body's input (embedding output) and output (final norm), with
    retain_grad, so their .grad is there after a backward inside the block."""
    probes: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_mod, _inp, out):
            out.retain_grad()
            probes[name] = out
        return hook

    handles = [model.embed.register_forward_hook(keep("body_in")),
               model.norm_f.register_forward_hook(keep("body_out"))]
    try:
        yield probes
    finally:
        for h in handles:
            h.remove()
