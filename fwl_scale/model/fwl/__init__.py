"""The Fast Weight Layer (docs/design.md §1), one package:

    layer.py             FastWeightLayer: slow pass, hand-written per-token gradients, fast pass
    sums.py              the six running sums one forward reads (chunk totals, carried and received state)
    sequential.py        model.fwl.update=sequential: inner chunks, gradients at the fast weights of their start
    unembedding.py       model.fwl.fast_set: the output bias and the unembedding as fast weights
    functional.py        the LayerNorm's statistics and the choice of form, shared with the cost models
    fast_weights.py      the state operator: causal linear attention and cumulative sums in chunks
    naive.py             the references the tests compare with: the FWL contract with autograd, the operator as a loop
    state.py             FWLState, what crosses segment boundaries, and the normalisers' counts
    context_parallel.py  how the sums cross context-parallel ranks (state scan or keys and values)
"""
from fwl_scale.model.fwl.functional import fast_chunk
from fwl_scale.model.fwl.layer import FastWeightLayer
from fwl_scale.model.fwl.state import FAST_TENSORS, FWLState

__all__ = ["FAST_TENSORS", "FWLState", "FastWeightLayer", "fast_chunk"]
