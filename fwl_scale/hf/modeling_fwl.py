"""The transformers model of an exported fwl_scale model: `FWLForCausalLM`, loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

It wraps fwl_scale's own model (`fwl_scale.model.build_model`, the GPT with its FWL or plain head)
instead of re-implementing the math, so every model option carries over exactly; fwl_scale must be
importable where the model is loaded. The weights are GPT's under the prefix `model.`.

Scoring, `model(input_ids, labels=input_ids)`: the logits and the loss are fwl_scale's. Documents are
separated by the document-end token `<|endoftext|>` (config.eod_token_id): a token after it starts a new
document (the body's attention and positions restart, the FWL's fast weights reset), as in the trainer's
packed rows, where every document ends with that token. The FWL adapts on the observed next tokens in
`input_ids`, so the logits never depend on `labels`; `labels` (shifted inside, -100 ignored; where not
-100 they must equal `input_ids`) choose the loss terms: the trainer's convention, where the token after
a document's end is not predicted. The last position's next token is not in `input_ids`: it is predicted
and its gradient is pending (not used by any position). Sequences longer than config.seq_len run in
aligned windows of seq_len (positions restart at each window, the FWL state is carried), as fwl_scale
evaluates long documents.

Padding: `attention_mask` zeros make padding its own document (needs config.document_mask), so a
left-padded row gives the same logits as the row alone, up to seq_len tokens.

Generation, `model.generate(...)`: the cache (`FWLCache`) is fwl_scale's StreamingSession: the FWL's
running sums carried token by token, each generated token's gradient entering them once the next token is
chosen (O(1) FWL work per token), and the body's keys and values of the current window (O(window)
attention work per token; emptied at each window start, as the windows of the scoring path).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_fwl import FWLHFConfig

# In a try block so that transformers' import check lets this message through.
try:
    from fwl_scale import IGNORE_INDEX
    from fwl_scale.model import StreamingSession
    from fwl_scale.model.blocks import Rotary
    from fwl_scale.model.gpt import GPT, build_model
except ImportError as _e:
    raise ImportError("this model's code runs fwl_scale's own model: install the fwl_scale package (pip install "
                      f"fwl_scale, or the repository it was exported from) where the model is loaded ({_e})") from None


def document_ids(input_ids: Tensor, eod: int, attention_mask: Tensor | None = None,
                 eods_before: Tensor | None = None) -> Tensor:
    """Per token the number of document-end tokens before it (plus `eods_before` [B], those of earlier
    pieces); padding (attention_mask 0) is -1, a document of its own."""
    is_eod = (input_ids == eod).long()
    if attention_mask is not None:
        is_eod = is_eod * attention_mask.long()
    docs = torch.cumsum(is_eod, dim=1) - is_eod
    if eods_before is not None:
        docs = docs + eods_before[:, None]
    if attention_mask is not None:
        docs = torch.where(attention_mask.bool(), docs, torch.full_like(docs, -1))
    return docs


def next_token_labels(input_ids: Tensor, docs: Tensor) -> Tensor:
    """The trainer's labels: the next token of the same document, IGNORE_INDEX elsewhere and at the last
    position (its next token is not known)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    same = (docs[:, 1:] == docs[:, :-1]) & (docs[:, 1:] >= 0)
    labels[:, :-1] = torch.where(same, input_ids[:, 1:], IGNORE_INDEX)
    return labels


@dataclass
class FWLCache:
    """The state generation carries: fwl_scale's StreamingSession (FWL running sums with the last token
    pending, the body's window) and the document-end tokens seen so far per row."""
    session: StreamingSession
    eods: Tensor  # [B]
    seen: int = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: row i continues as row beam_idx[i]."""
        self.session.select_rows(beam_idx)
        self.eods = self.eods.index_select(0, beam_idx.to(self.eods.device))


class FWLForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FWLHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: FWLHFConfig):
        super().__init__(config)
        self.model: GPT = build_model(config.model_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is FWLCache, made by forward

    def _init_weights(self, module) -> None:
        # GPT initialises its parameters itself (seeded); the rotary frequencies are a non-persistent
        # buffer that a meta-device construction (from_pretrained) leaves empty.
        if isinstance(module, Rotary):
            rotary_dim = 2 * module.inv_freq.shape[0]  # the rotated width (the head's, or its first part)
            module.inv_freq = 1.0 / (self.config.rope_theta ** (
                torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim))

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return None  # tied inside GPT (its unembedding is the embedding)

    def _check_padding(self, attention_mask: Tensor | None) -> None:
        if attention_mask is not None and not bool(attention_mask.all()) and not self.config.document_mask:
            raise ValueError("attention_mask with padding needs a model trained with document_mask (padding is "
                             "made a document of its own); this model has document_mask: false")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                cache: FWLCache | None = None, use_cache: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """See the module docstring. With `cache`, `input_ids` are the tokens after those already in it
        (`attention_mask` may cover all of them; its last columns are used)."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("FWLForCausalLM takes input_ids, not inputs_embeds (the FWL needs the tokens)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        n = input_ids.shape[1]
        mask = attention_mask[:, -n:] if attention_mask is not None else None
        self._check_padding(mask)
        if cache is None and (labels is not None or not use_cache):
            logits, loss = self._score(input_ids, mask, labels)
            return CausalLMOutputWithPast(loss=loss, logits=logits)
        if labels is not None:
            raise ValueError("labels with a cache: score whole sequences without one (the loss needs every "
                             "next token in input_ids)")
        if cache is None:
            cache = FWLCache(StreamingSession(self.model, self.config.seq_len),
                             torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device))
        docs = document_ids(input_ids, self.config.eod_token_id, mask, cache.eods)
        logits = cache.session.feed(input_ids, docs)
        is_eod = input_ids == self.config.eod_token_id
        cache.eods = cache.eods + (is_eod if mask is None else is_eod & mask.bool()).long().sum(1)
        cache.seen += n
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)

    def _score(self, input_ids: Tensor, mask: Tensor | None, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Logits and loss of whole sequences, in aligned windows of seq_len with the FWL state carried
        (fwl_scale.eval.perplexity's long-document evaluation; one window up to seq_len)."""
        docs = document_ids(input_ids, self.config.eod_token_id, mask)
        targets = next_token_labels(input_ids, docs)
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels has shape {tuple(labels.shape)}, input_ids {tuple(input_ids.shape)}")
            if not bool(((labels == IGNORE_INDEX) | (labels == input_ids)).all()):
                raise ValueError("labels must be input_ids with -100 at the positions left out of the loss (the "
                                 "FWL adapts on the observed tokens; labels are shifted inside)")
        W = self.config.seq_len
        state, logits, token_loss = None, [], []
        for a in range(0, input_ids.shape[1], W):
            b = min(a + W, input_ids.shape[1])
            lab = targets[:, a:b].clone()
            if b < input_ids.shape[1]:  # the next window's first token is this window's last label
                lab[:, -1] = torch.where(docs[:, b] == docs[:, b - 1], input_ids[:, b], IGNORE_INDEX)
            out = self.model(input_ids[:, a:b], lab, docs[:, a:b], fwl_state=state, return_logits=True,
                             return_state=self.model.fwl is not None)
            state = out.fwl_state
            logits.append(out.logits)
            token_loss.append(out.token_loss)
        logits_t = torch.cat(logits, dim=1)
        loss = None
        if labels is not None:
            keep = (targets[:, :-1] != IGNORE_INDEX) & (labels[:, 1:] != IGNORE_INDEX)
            tl = torch.cat(token_loss, dim=1)[:, :-1]
            loss = (tl * keep).sum() / keep.sum().clamp(min=1)
        return logits_t, loss

    def prepare_inputs_for_generation(self, input_ids: Tensor, cache: FWLCache | None = None,
                                      attention_mask: Tensor | None = None, **kwargs) -> dict:
        if cache is not None:
            input_ids = input_ids[:, cache.seen:]
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask, "use_cache": True}
