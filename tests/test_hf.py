"""Export to Hugging Face (tools/convert_to_hf.py, fwl_scale/hf/), checked through transformers' own loader
(`from_pretrained(..., trust_remote_code=True)`) in a fresh process:

* a single-process FWL checkpoint trained on generated text: the tokenizer gives fwl_scale's ids; the
  logits equal fwl_scale's model in fp32 (1e-5 relative) on text holding a document end, one window and
  three windows long (the reference: the plain forward, and StreamingSession), the loss equals the
  trainer's; greedy generate() equals StreamingSession's greedy generation token for token (past a
  window end and a document end);
* a tp=2 and a ZeRO-3 (dp=2) checkpoint (2 gloo processes, DeepSpeed's engine): the exported model's
  logits equal the parallel model's own (fp32; bf16 export within 2e-2 of the largest logit); a pp=2
  checkpoint: its last stage's per-token losses equal the exported logits'; a baseline (FWL off) exports
  with the same classes;
* left padding: each row of a padded batch generates what it generates alone; beam search (the cache
  reordered) scores its best sequence as the whole forward does;
* the key/value cache of streaming and generation equals the body on the whole window (float64);
* round trip: the exported weights read back equal the checkpoint's exactly, `import` makes a step-0
  checkpoint of them, and training continues from them (its first loss is the exported model's);
* bad input: an existing OUT_DIR, a foreign tokenizer, a missing weight shard, a changed tokenizer file.

Import of other transformers bodies: tests/test_hf_import.py.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fwl_scale.checkpoint.native import CheckpointManager, find_latest
from fwl_scale.checkpoint.weights import load_model_weights
from fwl_scale.config import config_to_nested, load_config
from fwl_scale.data import train_tokenizer
from fwl_scale.hf.configuration_fwl import FWLHFConfig
from fwl_scale.hf.convert import (CODE_FILES, HERE, ExportError, export_checkpoint, import_hf,
                                  load_hf_weights)
from fwl_scale.hf.modeling_fwl import document_ids, next_token_labels
from fwl_scale.hf.tokenization_fwl import FWLTokenizer
from fwl_scale.model import StreamingSession, build_model
from fwl_scale.model.blocks import KVCache
from fwl_scale.parallel import init_parallel_state
from fwl_scale.train.distributed import DistInfo
from fwl_scale.train.loop import Trainer
from fwl_scale.train.engine import build_training_engine
from tests.distributed import run_distributed
from tests.engine_support import micro_batch
from tests.hf_support import T, TOL, config, hf_side, reference, rel_err, trained, write_text  # noqa: F401 (a fixture)
from tests.train_support import REPO, fwl_env, step_losses

TOL_BF16 = 2e-2


def greedy(model, prompt: torch.Tensor, new: int, eod: int) -> torch.Tensor:
    """Greedy generation with fwl_scale's StreamingSession, one token at a time."""
    session = StreamingSession(model, model.cfg.seq_len)
    docs = document_ids(prompt, eod)
    out = []
    with torch.no_grad():
        logits = session.feed(prompt, docs)
        doc = docs[:, -1] + (prompt[:, -1] == eod).long()
        for _ in range(new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = session.feed(nxt, doc[:, None])
            doc = doc + (nxt[:, 0] == eod).long()
    return torch.cat(out, dim=1)


def our_model(hf_dir: Path):
    weights, model_cfg = load_hf_weights(hf_dir)
    model = build_model(model_cfg)
    model.load_state_dict(weights)
    return model.eval()


def test_single_process_export(trained, tmp_path):
    run, cfg, tok, text, ids = trained
    hf = tmp_path / "hf"
    assert subprocess.run([sys.executable, str(REPO / "tools" / "convert_to_hf.py"), str(run), str(hf)], cwd=REPO,
                          env=fwl_env(), capture_output=True, text=True, timeout=300).returncode == 0
    assert sorted(p.name for p in hf.iterdir()) == sorted([
        "README.md", "config.json", "configuration_fwl.py", "generation_config.json", "model.safetensors",
        "modeling_fwl.py", "spm.model", "tokenization_fwl.py", "tokenizer_config.json"])
    assert not list(tmp_path.glob(".hf.partial*"))
    card = (hf / "README.md").read_text()
    assert "step **2**" in card and "fwl_scale` package must be importable" in card and "documents" in card
    hf_cfg = json.loads((hf / "config.json").read_text())
    assert hf_cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_fwl.FWLForCausalLM"
    assert hf_cfg["d_model"] == 32 and hf_cfg["fwl"]["step_size_init"] == 0.3 and hf_cfg["eod_token_id"] == tok.eos_id

    model = our_model(hf)
    n_long = ids.shape[1]
    prompt = ids[:, 5:19]  # a document end inside; prompt + 12 new tokens cross the window end at 16
    pad = 3
    batch = torch.cat([prompt, torch.cat([torch.full((1, pad), tok.eos_id), prompt[:, pad:]], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    got = hf_side(hf, tmp_path, ids, [T, n_long], text=text[0], prompt=prompt, new=12, padded=(batch, mask))
    assert got["model_class"] == "FWLForCausalLM" and got["dtype"] == "torch.float32"
    assert got["tok_ids"] == tok.encode(text[0]) and got["decoded"] == text[0]
    ref = reference(model, ids[:, :T], tok.eos_id)
    assert (ids[:, :T] == tok.eos_id).any()  # two documents in the window
    assert rel_err(got[f"logits{T}"], ref.logits) <= TOL
    assert abs(float(got[f"loss{T}"]) - float(ref.loss)) <= TOL * float(ref.loss)
    # Past the window: StreamingSession (another code path: pending positions) on the same tokens.
    with torch.no_grad():
        stream = StreamingSession(model, T).feed(ids, document_ids(ids, tok.eos_id))
    assert rel_err(got[f"logits{n_long}"], stream) <= TOL
    assert torch.equal(got["generated"], greedy(model, prompt, 12, tok.eos_id))
    beam_score, rescored = got["beam"]
    assert abs(beam_score - rescored) <= TOL * abs(rescored), got["beam"]
    # Left padding is a document of its own: each row generates what it generates alone (within seq_len).
    assert torch.equal(got["generated_padded"][0], greedy(model, prompt, 2, tok.eos_id)[0])
    assert torch.equal(got["generated_padded"][1], greedy(model, prompt[:, pad:], 2, tok.eos_id)[0])


PARALLEL = {"tp2": ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1"),
            "zero3": ("parallel.zero_stage=3",),
            "pp2": ("parallel.pp=2", "parallel.zero_stage=1")}


def _parallel_checkpoint(rank: int, world: int, out: str, ids: torch.Tensor, layout: str) -> None:
    """A checkpoint of `layout` on 2 ranks after two steps, and the parallel model's own logits (a
    pipeline's last stage gives per-token losses only: those instead)."""
    cfg = config(Path(out), *PARALLEL[layout])
    ps = init_parallel_state(cfg)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, dp=ps.dp_size, device=torch.device("cpu"),
                    backend="gloo")
    torch.manual_seed(3)
    te = build_training_engine(cfg, ps, info)
    for k in range(2):
        b = micro_batch(k, ps.dp_rank)
        if te.is_pipeline:
            te.pipeline_step.run([b])
            continue
        out_ = te.engine(b["input_ids"], b["labels"], b["doc_ids"])
        te.engine.backward(out_.loss)
        te.engine.step()
    client = {"fwl_step": {"step": 1, "tokens": 0, "skipped_total": 0, "nonfinite_in_row": 0}, "data": {}, "rng": []}
    CheckpointManager(Path(out), 1, rank).save(te.engine, 1, client, cfg, ps.dp_size)
    docs = document_ids(ids, 1)
    if te.is_pipeline:
        labels = next_token_labels(ids, docs)
        forward = te.eval_forward([{"input_ids": ids, "labels": labels, "doc_ids": docs}])
        got = forward(ids, labels, docs)
        if te.is_last_stage:
            torch.save(got.token_loss, Path(out) / "parallel_token_loss.pt")
        return
    te.engine.eval()
    with torch.no_grad():
        logits = te.engine.module(ids, next_token_labels(ids, docs), docs, return_logits=True).logits
    if rank == 0:
        torch.save(logits, Path(out) / "parallel_logits.pt")


def test_zero3_checkpoint(trained, tmp_path):
    ids = trained[4][:, :T]
    run_distributed(2, _parallel_checkpoint, str(tmp_path / "zero3"), ids, "zero3")
    export_checkpoint(tmp_path / "zero3", tmp_path / "hf")
    got = hf_side(tmp_path / "hf", tmp_path, ids, [T])
    assert rel_err(got[f"logits{T}"], torch.load(tmp_path / "zero3" / "parallel_logits.pt")) <= TOL


def test_pipeline_checkpoint(trained, tmp_path):
    """pp=2: no rank holds the whole model, and the export joins the stages' layers (and the tied
    embedding's two copies). The last stage's per-token losses, every position of a window holding a
    document end, equal those of the exported model's logits."""
    ids = trained[4][:, :T]
    run_distributed(2, _parallel_checkpoint, str(tmp_path / "pp2"), ids, "pp2")
    export_checkpoint(tmp_path / "pp2", tmp_path / "hf")
    got = hf_side(tmp_path / "hf", tmp_path, ids, [T])
    labels = next_token_labels(ids, document_ids(ids, 1))
    assert (labels == -100).any() and (labels != -100).sum() > T // 2  # a document end, and a real window
    token_loss = torch.nn.functional.cross_entropy(got[f"logits{T}"].transpose(1, 2), labels, reduction="none")
    assert rel_err(token_loss, torch.load(tmp_path / "pp2" / "parallel_token_loss.pt")) <= TOL


def test_tensor_parallel_checkpoint_and_baseline(trained, tmp_path):
    run, cfg, tok, text, ids = trained
    ids = ids[:, :T]
    out = tmp_path / "tp2"
    run_distributed(2, _parallel_checkpoint, str(out), ids, "tp2")
    hf = tmp_path / "hf_tp2"
    export_checkpoint(out, hf, max_shard_mb=0.05)  # also: weights in several files with an index
    assert len(json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(hf.glob("model-*-of-*.safetensors"))) > 1
    got = hf_side(hf, tmp_path, ids, [T])
    assert rel_err(got[f"logits{T}"], torch.load(out / "parallel_logits.pt")) <= TOL
    # bf16 weights, run in bf16 (the single-process run's): 2e-2 of the largest logit (bf16 keeps 8 bits;
    # measured 0.8e-2).
    hf_bf16 = tmp_path / "hf_bf16"
    export_checkpoint(run, hf_bf16, dtype="bfloat16")
    got = hf_side(hf_bf16, tmp_path, ids, [T])
    assert got["dtype"] == "torch.bfloat16"
    fp32 = build_model(cfg.model)
    fp32.load_state_dict(load_model_weights(find_latest(run / "checkpoints")))
    assert rel_err(got[f"logits{T}"].float(), reference(fp32.eval(), ids, tok.eos_id).logits) <= TOL_BF16

    # A baseline (FWL off) exports with the same classes.
    base = tmp_path / "base"
    assert Trainer(config(base, "model.fwl.enabled=false")).run() == 0
    hf_base = tmp_path / "hf_base"
    export_checkpoint(base, hf_base)
    got = hf_side(hf_base, tmp_path, ids, [T])
    assert got["model_class"] == "FWLForCausalLM"
    model = our_model(hf_base)
    assert model.fwl is None
    assert rel_err(got[f"logits{T}"], reference(model, ids, tok.eos_id).logits) <= TOL


def test_round_trip_and_training_continues(trained, tmp_path):
    run, cfg, tok, text, ids = trained
    hf = tmp_path / "hf"
    export_checkpoint(run, hf)
    weights, model_cfg = load_hf_weights(hf)
    original = load_model_weights(find_latest(run / "checkpoints"))
    assert weights.keys() == original.keys() and all(torch.equal(weights[k], original[k]) for k in weights)
    assert model_cfg == cfg.model

    new_run = tmp_path / "from_hf"
    step0 = import_hf(hf, config(new_run))
    assert step0.name == "step_00000000"
    again = load_model_weights(find_latest(new_run / "checkpoints"))
    assert all(torch.equal(again[k], original[k]) for k in original)
    # Training continues from the exported weights: its first loss is theirs on its first batch.
    trainer = Trainer(config(new_run))
    batch = trainer.loader.next_batch()
    trainer.loader.close()
    trainer.stop.uninstall()
    trainer.metrics.close()
    model = our_model(hf)
    with torch.no_grad():
        expected = float(model(*(torch.as_tensor(batch[k]) for k in ("input_ids", "labels", "doc_ids"))).loss)
    assert Trainer(config(new_run)).run() == 0
    losses = step_losses(new_run)
    assert sorted(losses) == [1, 2] and abs(losses[1] - expected) <= 1e-5 * expected, (losses, expected)


def test_config_json_naming_the_old_config_class_loads(tmp_path):
    """An export written before the configuration class was renamed to FWLHFConfig names
    `configuration_fwl.FWLConfig` in config.json's auto_map: with the current code files it still resolves
    (to the same class and model_type) through transformers' loader, in a fresh process."""
    cfg = load_config(None, [])
    hf = tmp_path / "export"
    hf.mkdir()
    for name in CODE_FILES:
        shutil.copyfile(HERE / name, hf / name)
    written_before = FWLHFConfig(**config_to_nested(cfg)["model"], architectures=["FWLForCausalLM"],
                                 auto_map={"AutoConfig": "configuration_fwl.FWLConfig",
                                           "AutoModelForCausalLM": "modeling_fwl.FWLForCausalLM"})
    written_before.to_json_file(str(hf / "config.json"), use_diff=False)
    load = ("import sys; from transformers import AutoConfig; "
            "c = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True); "
            "print(type(c).__name__, c.model_type, repr(c.model_config()) == sys.argv[2])")
    proc = subprocess.run([sys.executable, "-c", load, str(hf), repr(cfg.model)], cwd=tmp_path,
                          env=fwl_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["FWLHFConfig", "fwl_scale", "True"], proc.stdout


def test_bad_input(trained, tmp_path):
    run, cfg, tok, text, ids = trained
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(ExportError, match=f"{existing} already exists"):
        export_checkpoint(run, existing)
    assert list(existing.iterdir()) == []
    # A tokenizer of the same size trained on other text: not the one the shards were made with.
    other_text = tmp_path / "other.jsonl"
    write_text(other_text, 200, 7)
    foreign = train_tokenizer((json.loads(line)["text"] for line in open(other_text)), tmp_path / "foreign.model", 512)
    with pytest.raises(ExportError, match=r"foreign.model .*is not the one the training shards were made with"):
        export_checkpoint(run, tmp_path / "hf_foreign", tokenizer=foreign.path)
    assert not (tmp_path / "hf_foreign").exists() and not list(tmp_path.glob(".hf_foreign*"))
    # A missing weight shard, and a tokenizer file changed after the export, are named.
    hf = tmp_path / "hf"
    export_checkpoint(run, hf, max_shard_mb=0.05)
    shard = sorted(hf.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ExportError, match=f"{shard.name}: missing"):
        load_hf_weights(hf)
    (hf / "spm.model").write_bytes(foreign.path.read_bytes())
    sha = json.loads((hf / "tokenizer_config.json").read_text())["fwl_tokenizer_sha256"]
    with pytest.raises(ValueError, match=r"spm.model: sha256 .* differs from the .* recorded"):
        FWLTokenizer(str(hf / "spm.model"), fwl_tokenizer_sha256=sha)


def test_kv_cache_equals_recomputed_window():
    """GPT.body_cached (keys and values of the window cached per layer) against the body recomputed on the
    whole window, float64, token by token and in a piece of 3, with documents starting inside the window."""
    cfg = load_config(None, ["model.d_model=16", "model.n_heads=2", "model.n_layers=2", "model.seq_len=12",
                             "model.vocab_size=50", "model.vocab_multiple=64"]).model
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    ids = torch.randint(0, 50, (2, 12))
    docs = torch.zeros(2, 12, dtype=torch.long)
    docs[0, 4:], docs[0, 9:], docs[1, 7:] = 1, 2, 1
    with torch.no_grad():
        whole = model.body(ids, docs)
        kv = [KVCache() for _ in model.blocks]
        cuts = [0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12]  # one piece of 3 tokens, the rest one by one
        got = torch.cat([model.body_cached(ids[:, a:b], docs[:, a:b], docs[:, :a], kv)
                         for a, b in zip(cuts[:-1], cuts[1:])], dim=1)
    assert float((got - whole).abs().max()) <= 1e-12 * float(whole.abs().max())
    assert kv[0].k.shape[2] == 12
