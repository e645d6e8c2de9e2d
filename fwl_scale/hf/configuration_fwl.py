"""The transformers configuration of an exported fwl_scale model (copied next to the weights by
tools/convert_to_hf.py and loaded with `AutoConfig.from_pretrained(dir, trust_remote_code=True)`).

config.json holds the fields of fwl_scale's ModelConfig as they are (the FWL's settings in the nested
`fwl` mapping), the document-end token and the usual transformers names mapped onto them
(hidden_size = d_model, ...). `model_config()` rebuilds the ModelConfig, validated by fwl_scale itself.
"""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# The fields of fwl_scale's ModelConfig stored in config.json (checked against the dataclass at export).
MODEL_FIELDS = ("vocab_size", "vocab_multiple", "d_model", "n_layers", "n_heads", "seq_len", "mlp_mult",
                "norm_eps", "rope_theta", "rope_fraction", "norm", "mlp", "mlp_hidden", "bias", "positions",
                "max_positions", "n_kv_heads", "init_std", "tie_embeddings", "document_mask", "attention", "fwl")


class FWLHFConfig(PretrainedConfig):
    """config.json of an exported model (named apart from fwl_scale.config.FWLConfig, the model.fwl section)."""

    model_type = "fwl_scale"
    # No max_position_embeddings: any length runs (aligned windows of seq_len, the FWL state carried).
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    # The defaults are fwl_scale's ModelConfig defaults (configs/tiny.yaml); an export writes every field.
    vocab_size: int = 4096
    vocab_multiple: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 256
    mlp_mult: int = 4
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # The body's variant (an imported GPT-2 or Llama body); exports written before these existed lack them
    # and get fwl_scale's own body, which they hold.
    rope_fraction: float = 1.0
    norm: str = "layernorm"
    mlp: str = "gelu"
    mlp_hidden: int | None = None
    bias: bool = True
    positions: str = "rotary"
    max_positions: int | None = None
    n_kv_heads: int | None = None
    init_std: float = 0.02
    tie_embeddings: bool = True
    document_mask: bool = True
    # The document-masked attention's kernel (a run-time choice, not a weight: dense until flex has run on a GPU, as ModelConfig).
    attention: str = "dense"
    fwl: dict | None = None  # fwl_scale's model.fwl section; None: its defaults
    # The document-end token (`<|endoftext|>`): documents are separated by it (document ids, FWL resets).
    eod_token_id: int = 1
    eos_token_id: int | None = 1
    pad_token_id: int | None = 1
    bos_token_id: int | None = None
    tie_word_embeddings: bool = False  # the model ties internally (GPT.unembedding); nothing for transformers to tie
    use_cache: bool = True

    def model_config(self) -> Any:
        """fwl_scale's ModelConfig for these fields (fwl_scale validates them)."""
        # At call time: the configuration must load (AutoConfig) even where fwl_scale is missing; the
        # model needs it and says so (modeling_fwl.py).
        try:
            from fwl_scale.config import config_from_dict
        except ImportError as e:
            raise ImportError("this model's code runs fwl_scale's own model: install the fwl_scale package "
                              f"(pip install fwl_scale, or the repository it was exported from) ({e})") from None
        fields = {k: getattr(self, k) for k in MODEL_FIELDS if k != "fwl"}
        if self.fwl is not None:
            fields["fwl"] = dict(self.fwl)
        return config_from_dict({"model": fields}, "config.json").model


# Kept until 0.2: exports written before the class was renamed name `configuration_fwl.FWLConfig` in
# config.json's auto_map; the alias lets such an export load with the current code files copied over its own.
FWLConfig = FWLHFConfig
