"""Models: the GPT body with a Fast Weight Layer head (or a plain unembedding)."""
from fwl_scale.model.fwl import FastWeightLayer, FWLState
from fwl_scale.model.gpt import GPT, ModelOutput, build_model
from fwl_scale.model.streaming import StreamingSession

__all__ = ["GPT", "ModelOutput", "StreamingSession", "build_model", "FastWeightLayer", "FWLState"]
