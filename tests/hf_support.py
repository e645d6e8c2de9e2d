"""Shared pieces of the Hugging Face tests (test_hf.py, test_hf_import.py): generated text, a tiny
FWL config on it, a 2-step single-process run to export, what transformers' own loader gives for an
exported directory (in a fresh process), fwl_scale's reference logits, and the relative error the logits
are held to."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fwl_scale.config import load_config
from fwl_scale.data import prepare_data
from fwl_scale.data.tokenizer import Tokenizer
from fwl_scale.hf.modeling_fwl import document_ids, next_token_labels
from fwl_scale.train.loop import Trainer
from tests.train_support import REPO, fwl_env

DATA_ROOT = REPO / ".cache" / "tests" / "hf_data_v1"
T = 16  # model.seq_len
TOL = 1e-5


def write_text(path: Path, n_docs: int, seed: int) -> None:
    """Documents of pseudo-words (a fixed 300-word vocabulary, sentences, punctuation): real enough text
    for a byte-fallback BPE, made here instead of downloaded."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "tor", "vas", "ri", "un", "pel", "sa", "dor", "fi", "gu", "ham", "je", "wil"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    with open(path, "w") as f:
        for _ in range(n_docs):
            sents = []
            for _ in range(rng.randint(3, 12)):
                s = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
                sents.append(s[0].upper() + s[1:] + rng.choice([".", "!", "?", ","]))
            f.write(json.dumps({"text": " ".join(sents) + "\n"}) + "\n")


def overrides(out_dir: Path, *extra: str) -> list[str]:
    return ["model.d_model=32", "model.n_heads=2", "model.n_layers=2", f"model.seq_len={T}", "model.vocab_size=512",
            "model.fwl.chunk_size=8", "model.fwl.step_size_init=0.3", f"data.train=[{DATA_ROOT / 'train.jsonl'}]",
            f"data.root={DATA_ROOT}", "data.loader_workers=0", "data.workers=1", "parallel.micro_batch=2",
            "train.steps=2", "train.warmup_steps=1", "train.lr=0.01", "train.eval_every=1000", "train.save_every=2",
            "train.eval_batches=1", "train.log_every=1", "train.wandb.enabled=false", f"train.out_dir={out_dir}", *extra]


def config(out_dir: Path, *extra: str):
    if not (DATA_ROOT / "train.jsonl").is_file():
        DATA_ROOT.mkdir(parents=True, exist_ok=True)
        write_text(DATA_ROOT / "train.jsonl", 300, 0)
    return load_config(None, overrides(out_dir, *extra))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir, config, tokenizer, evaluation text ids): a 2-step single-process FWL run."""
    out = tmp_path_factory.mktemp("run")
    cfg = config(out)
    paths = prepare_data(cfg)
    assert Trainer(cfg).run() == 0
    tok = Tokenizer.load(paths.tokenizer)
    text = [json.loads(line)["text"] for line in open(DATA_ROOT / "train.jsonl")][-2:]
    ids = tok.encode(text[0])[:10] + [tok.eos_id] + tok.encode(text[1])[:3 * T]
    return out, cfg, tok, text, torch.tensor([ids])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


HF_SIDE = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d, ids_file, out_file = sys.argv[1:4]
inp = torch.load(ids_file)
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
out = {"model_class": type(model).__name__, "dtype": str(next(model.parameters()).dtype),
       "tok_ids": tok(inp["text"]).input_ids, "decoded": tok.decode(tok(inp["text"]).input_ids)}
with torch.no_grad():
    ids = inp["ids"]
    for n in inp["lengths"]:
        r = model(ids[:, :n], labels=ids[:, :n])
        out[f"logits{n}"], out[f"loss{n}"] = r.logits, r.loss
    g = inp["prompt"]
    out["generated"] = model.generate(g, attention_mask=torch.ones_like(g), max_new_tokens=inp["new"],
                                      do_sample=False, eos_token_id=None)[:, g.shape[1]:]
    # Beam search (the cache reordered): the best beam's score is its log-probability, rescored whole.
    b = model.generate(g, attention_mask=torch.ones_like(g), max_new_tokens=inp["new"], num_beams=3,
                       do_sample=False, length_penalty=0.0, eos_token_id=None, output_scores=True,
                       return_dict_in_generate=True)
    lp = torch.log_softmax(model(b.sequences, use_cache=False).logits.float(), -1)[0, g.shape[1] - 1:-1]
    out["beam"] = (float(b.sequences_scores[0]), float(lp.gather(-1, b.sequences[0, g.shape[1]:, None]).sum()))
    if "padded" in inp:  # a batch of two prompts, the second left-padded
        p, m = inp["padded"]
        out["generated_padded"] = model.generate(p, attention_mask=m, max_new_tokens=2, do_sample=False,
                                                 eos_token_id=None)[:, p.shape[1]:]
torch.save(out, out_file)
"""


def hf_side(hf_dir: Path, tmp: Path, ids: torch.Tensor, lengths: list[int], text: str = "",
            prompt: torch.Tensor | None = None, new: int = 0, padded: tuple | None = None) -> dict:
    """What transformers' loader gives, in a fresh process (the installed fwl_scale is this checkout)."""
    inp = {"ids": ids, "lengths": lengths, "text": text, "prompt": prompt if prompt is not None else ids[:, :2],
           "new": max(new, 1)}
    if padded is not None:
        inp["padded"] = padded
    torch.save(inp, tmp / "inp.pt")
    proc = subprocess.run([sys.executable, "-c", HF_SIDE, str(hf_dir), str(tmp / "inp.pt"), str(tmp / "out.pt")],
                          cwd=tmp, env=fwl_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / "out.pt")


def reference(model, ids: torch.Tensor, eod: int):
    """fwl_scale's own logits and loss of `ids` (one window): the trainer's labels and document ids."""
    docs = document_ids(ids, eod)
    with torch.no_grad():
        return model(ids, next_token_labels(ids, docs), docs, return_logits=True)
