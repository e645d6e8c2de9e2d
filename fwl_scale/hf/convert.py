"""Export of any fwl_scale checkpoint to a Hugging Face model directory, and the way back.

    python tools/convert_to_hf.py CHECKPOINT OUT_DIR [--tokenizer spm.model] [--manifest manifest.json]
                                  [--dtype float32|bfloat16] [--max-shard-mb N]

OUT_DIR then holds what `AutoModelForCausalLM/AutoTokenizer.from_pretrained(OUT_DIR, trust_remote_code=True)`
load: config.json (fwl_scale's ModelConfig fields, model_type, auto_map), generation_config.json, the
weights (model.safetensors, or model-0000i-of-0000n.safetensors with model.safetensors.index.json above
--max-shard-mb), the modelling code (configuration_fwl.py, modeling_fwl.py: fwl_scale's own model
wrapped, so fwl_scale must be installed where it is loaded), the tokenizer (spm.model, tokenization_fwl.py,
tokenizer_config.json with the model file's sha256) and README.md (the model card: step, training config,
data manifest summary).

Any checkpoint layout (tp, pp, ZeRO, bf16; native or universal): the weights come from fwl_scale's
consolidation (`fwl ckpt consolidate`, which starts as many local processes as the checkpoint was written
by). Everything is written into a hidden staging directory beside OUT_DIR that is renamed to OUT_DIR at
the end, so an OUT_DIR that exists is complete; an existing OUT_DIR is refused.

Back (`load_hf_weights`): the exported weights under fwl_scale's parameter names and the ModelConfig;
`import_hf(HF_DIR, CONFIG, RUN_DIR)` makes them a step-0 checkpoint that `fwl train` continues from.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fwl_scale.train.checkpoint_convert import consolidate
from fwl_scale.checkpoint.native import resolve_checkpoint
from fwl_scale.checkpoint.optimizer import STATE_KEYS, optimizer_adapter
from fwl_scale.checkpoint.weights import read_consolidated
from fwl_scale.config import Config, ConfigError, config_from_dict, config_to_nested
from fwl_scale.data.manifest import MANIFEST, Manifest
from fwl_scale.data.tokenizer import EOS_PIECE, Tokenizer
from fwl_scale.hf.body_import import body_weights
from fwl_scale.hf.configuration_fwl import MODEL_FIELDS, FWLHFConfig
from fwl_scale.model import build_model
from fwl_scale.parallel.shards import shard_of
from fwl_scale.train.loop import Trainer

HERE = Path(__file__).resolve().parent
CODE_FILES = ("configuration_fwl.py", "modeling_fwl.py", "tokenization_fwl.py")
PREFIX = "model."  # FWLForCausalLM.model is fwl_scale's GPT
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_MB = 2048


class ExportError(ConfigError):
    """An export or import that cannot be done; the message names the file or directory."""


# ------------------------------------------------------------------------------ the checkpoint
def _read_checkpoint(checkpoint: str | Path, scratch: Path, dtype: str) -> tuple[dict[str, Tensor], dict, dict]:
    """(weights under fwl_scale's names, the training config dict, the checkpoint's marker) of any
    checkpoint, through fwl_scale's consolidation. The one place that touches checkpoint code."""
    ref = resolve_checkpoint(checkpoint)  # verified against its checksums here, once
    path = consolidate(ref.path, scratch / "consolidated.safetensors", dtype=dtype, verify=False)
    weights, cfg_dict = read_consolidated(path)
    path.unlink()
    return weights, cfg_dict, ref.meta


# ------------------------------------------------------------------------------- the tokenizer
def _tokenizer_and_manifest(cfg: Config, tokenizer: str | Path | None, manifest: str | Path | None
                            ) -> tuple[Tokenizer, Manifest | None]:
    """The training tokenizer (data.tokenizer or <data.root>/tokenizer/spm.model unless given) and the
    training data's manifest; a tokenizer that is not the one the shards were made with is refused."""
    tok_path = Path(tokenizer) if tokenizer else (Path(cfg.data.tokenizer) if cfg.data.tokenizer
                                                  else Path(cfg.data.root) / "tokenizer" / "spm.model")
    if not tok_path.is_file():
        raise ExportError(f"tokenizer {tok_path}: no such file (the checkpoint's data.tokenizer / data.root; "
                          "give the model file with --tokenizer)")
    tok = Tokenizer.load(tok_path)
    if tok.vocab_size != cfg.model.vocab_size:
        raise ExportError(f"tokenizer {tok_path}: {tok.vocab_size} pieces, the model has model.vocab_size "
                          f"{cfg.model.vocab_size}: not this model's tokenizer")
    if tok.id_to_piece(tok.eos_id) != EOS_PIECE:
        raise ExportError(f"tokenizer {tok_path}: its document-end piece is {tok.id_to_piece(tok.eos_id)!r}, "
                          f"not {EOS_PIECE!r}: not a fwl_scale tokenizer")
    man_path = Path(manifest) if manifest else Path(cfg.data.root) / "train" / MANIFEST
    man = None
    if man_path.is_file():
        man = Manifest.load(man_path)
        if man.tokenizer_checksum != tok.checksum:
            raise ExportError(f"tokenizer {tok_path} (sha256 {tok.checksum[:16]}) is not the one the training "
                              f"shards were made with ({man_path}: {man.tokenizer_checksum[:16]})")
    elif manifest:
        raise ExportError(f"manifest {man_path}: no such file")
    return tok, man


# ---------------------------------------------------------------------------------- weights
def _write_weights(weights: dict[str, Tensor], out: Path, max_shard_bytes: int) -> list[str]:

    named = {PREFIX + k: v.contiguous() for k, v in sorted(weights.items())}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, v in named.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE), metadata=meta)
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in named.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names + [INDEX]


def load_hf_weights(hf_dir: str | Path) -> tuple[dict[str, Tensor], Any]:
    """(weights under fwl_scale's parameter names, ModelConfig) of an exported directory."""


    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise ExportError(f"{d}: no config.json (not an exported model directory)")
    model_cfg = FWLHFConfig.from_json_file(str(d / "config.json")).model_config()
    if (d / INDEX).is_file():
        files = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))
    elif (d / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise ExportError(f"{d}: neither {SINGLE} nor {INDEX}")
    weights = {}
    for name in files:
        if not (d / name).is_file():
            raise ExportError(f"{d / name}: missing (listed in {d / INDEX})")
        try:
            with safe_open(str(d / name), framework="pt", device="cpu") as f:
                for k in f.keys():
                    if not k.startswith(PREFIX):
                        raise ExportError(f"{d / name}: tensor {k!r} is not under {PREFIX!r}: not an fwl_scale export")
                    weights[k[len(PREFIX):]] = f.get_tensor(k)
        except SafetensorError as e:
            raise ExportError(f"{d / name}: not a readable safetensors file ({e})") from None
    return weights, model_cfg


# ---------------------------------------------------------------------------------- the card
def _card(cfg: Config, meta: dict, step: int, tok: Tokenizer, man: Manifest | None, counts: dict[str, int],
          dtype: str) -> str:
    kind = "FWL" if cfg.model.fwl.enabled else "baseline (plain unembedding, FWL off)"
    layout = meta.get("source_layout") or meta.get("layout") or {}
    lines = [
        f"# {cfg.name}: fwl_scale {kind}", "",
        f"Exported from fwl_scale checkpoint `{meta.get('source') or ''}` at training step **{step}** "
        f"(layout {json.dumps(layout)}), weights in {dtype}.", "",
        f"Parameters: {counts['total']:,} (body {counts['body']:,}, FWL {counts['fwl']:,}, "
        f"embeddings {counts['embeddings']:,}).", "",
        "## Use", "",
        "The modelling code wraps fwl_scale's own model: **the `fwl_scale` package must be importable** where "
        "the model is loaded (`pip install` the repository it was trained with).", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)",
        "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
        "ids = tok('To be, or not to be', return_tensors='pt').input_ids",
        "loss = model(ids, labels=ids).loss          # fwl_scale's loss and logits",
        "out = model.generate(ids, max_new_tokens=20, do_sample=False)",
        "```", "",
        "- Documents are separated by `<|endoftext|>` (the document-end token): the body's attention and the "
        "FWL's fast weights restart after it, as in training.",
        "- The FWL adapts on the observed next tokens in `input_ids`; `labels` only choose the loss terms "
        "(must equal `input_ids` where not -100). The last position's next token is not known: its "
        "gradient is pending. Beyond seq_len tokens the body runs in aligned windows of seq_len with the "
        "FWL state carried.",
        "- `generate` carries the FWL state token by token (fwl_scale's StreamingSession); greedy, sampling "
        "and beam search.", "",
        "## Tokenizer", "",
        f"sentencepiece, {tok.vocab_size} pieces, document-end `{EOS_PIECE}` = id {tok.eos_id}, sha256 "
        f"`{tok.checksum}` (checked when the tokenizer loads).", "",
        "## Training data", "",
    ]
    if man is not None:
        lines += [f"Manifest `{man.path}`: {man.documents:,} documents, {man.tokens:,} tokens in "
                  f"{len(man.shards)} shards, dataset id `{man.dataset_id[:16]}`, inputs "
                  f"`{json.dumps(man.request.get('inputs', man.request))[:400]}`.", ""]
    else:
        lines += ["No data manifest was found at export; the tokenizer was not checked against the shards.", ""]
    lines += ["## Training config", "", "```yaml", yaml.safe_dump(config_to_nested(cfg), sort_keys=False).rstrip(),
              "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- the export
def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None,
                      manifest: str | Path | None = None, dtype: str = "float32",
                      max_shard_mb: float = DEFAULT_MAX_SHARD_MB) -> Path:
    """Writes the Hugging Face model directory `out_dir` for `checkpoint` (see the module docstring)."""
    out = Path(out_dir)
    if out.exists():
        raise ExportError(f"{out} already exists; export into a new directory")
    if max_shard_mb <= 0:
        raise ExportError(f"--max-shard-mb must be > 0, got {max_shard_mb}")
    stage = out.parent / f".{out.name}.partial{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        weights, cfg_dict, meta = _read_checkpoint(checkpoint, stage, dtype)
        cfg = config_from_dict(cfg_dict, f"checkpoint {checkpoint}")
        tok, man = _tokenizer_and_manifest(cfg, tokenizer, manifest)
        model_fields = config_to_nested(cfg)["model"]
        if set(model_fields) != set(MODEL_FIELDS):
            raise ExportError(f"fwl_scale's ModelConfig has fields {sorted(model_fields)}; configuration_fwl.py "
                              f"knows {sorted(MODEL_FIELDS)}: update it")
        counts = build_model(cfg.model, device="meta").param_counts()
        step = int(meta["step"])
        hf_cfg = FWLHFConfig(**model_fields, eod_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id,
                             architectures=["FWLForCausalLM"],
                             auto_map={"AutoConfig": "configuration_fwl.FWLHFConfig",
                                       "AutoModelForCausalLM": "modeling_fwl.FWLForCausalLM"},
                             fwl_scale_step=step, dtype=dtype)
        hf_cfg.to_json_file(str(stage / "config.json"), use_diff=False)
        (stage / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id, "bos_token_id": None}, indent=1) + "\n")
        for name in _write_weights(weights, stage, int(max_shard_mb * 2**20)):
            os.chmod(stage / name, 0o644)  # safetensors creates its files readable by the owner alone
        for name in CODE_FILES:
            shutil.copyfile(HERE / name, stage / name)
        shutil.copyfile(tok.path, stage / "spm.model")
        (stage / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "FWLTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_fwl.FWLTokenizer", None]},
            "fwl_tokenizer_sha256": tok.checksum, "eos_token": EOS_PIECE, "pad_token": EOS_PIECE,
            "clean_up_tokenization_spaces": False}, indent=1) + "\n")
        (stage / "README.md").write_text(_card(cfg, meta, step, tok, man, counts, dtype))
        if out.exists():
            raise ExportError(f"{out} appeared while exporting; the export is left in {stage}")
        os.rename(stage, out)
    except BaseException as e:
        if not (isinstance(e, ExportError) and "appeared while exporting" in str(e)):
            shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------------- the import
def _model_type(hf_dir: str | Path) -> str | None:
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: unreadable ({e}); not a model directory") from None


def import_hf(hf_dir: str | Path, cfg: Config) -> Path:
    """Starts a run from an exported model, or from a transformers GPT-NeoX, GPT-2 or Llama body
    (fwl_scale/hf/body_import.py: body and embeddings loaded, the FWL added): a step-0 checkpoint in cfg.train.out_dir (which must hold no
    checkpoints) with the exported weights, fresh Adam moments and the config's schedule and data; `fwl
    train` with the same config continues from it. One process (another layout: `fwl ckpt convert` it)."""
    if _model_type(hf_dir) == "fwl_scale":
        weights, model_cfg = load_hf_weights(hf_dir)
        saved, wanted = config_to_nested(Config(model=model_cfg))["model"], config_to_nested(cfg)["model"]
        diffs = [f"model.{k}: {saved[k]!r} in {Path(hf_dir) / 'config.json'}, {wanted[k]!r} in the config"
                 for k in saved if saved[k] != wanted[k]]
        if diffs:
            raise ExportError(f"{hf_dir} is another model than the config's: " + "; ".join(diffs[:6]))
    else:  # a transformers body: the FWL added on top, from fwl_scale's initialisation
        weights = body_weights(hf_dir, cfg)
    trainer = Trainer(cfg, resume=False)
    try:
        params = dict(trainer.te.named_parameters())
        if set(params) != set(weights):
            odd = sorted(set(params) ^ set(weights))
            raise ExportError(f"{hf_dir}: its tensors do not match the model's parameters ({', '.join(odd[:6])})")
        acc = optimizer_adapter(trainer.engine)
        acc.ensure_states()
        for name, p in params.items():
            full = weights[name].to(torch.float32)
            acc.set(p, {"param": shard_of(p, full), **{k: torch.zeros_like(shard_of(p, full)) for k in STATE_KEYS}})
        return trainer.save().path
    finally:
        trainer.stop.uninstall()
        trainer.loader.close()
        trainer.metrics.close()
