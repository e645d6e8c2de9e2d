"""Parallelism: the tp × cp × dp × pp layout and its process groups (layout), Megatron-style
tensor/sequence-parallel mappings (mappings), layers (layers) and shard bookkeeping (shards),
context-parallel collectives (context_parallel), sums over the whole world (world), where the model's
tensors live and the helpers the model calls at a region's edge (regions)."""
from fwl_scale.parallel.layers import ColumnParallelLinear, LayerNorm, RowParallelLinear, VocabParallelEmbedding
from fwl_scale.parallel.layout import Layout, ParallelState, TPContext, init_parallel_state, plan_layout
from fwl_scale.parallel.mappings import (all_reduce_tp, copy_to_tp, gather_from_sequence, gather_from_tp,
                                         reduce_from_tp, reduce_scatter_to_sequence, scatter_to_sequence,
                                         scatter_to_tp)
from fwl_scale.parallel.shards import full_state_dict, load_full_state_dict, merge_shards, take_shard

__all__ = [
    "Layout", "ParallelState", "TPContext", "init_parallel_state", "plan_layout",
    "copy_to_tp", "reduce_from_tp", "all_reduce_tp", "scatter_to_tp", "gather_from_tp",
    "scatter_to_sequence", "gather_from_sequence", "reduce_scatter_to_sequence",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "LayerNorm",
    "take_shard", "merge_shards", "full_state_dict", "load_full_state_dict",
]
