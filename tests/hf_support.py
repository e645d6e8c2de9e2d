"""Shared pieces of the Hugging Face tests (test_hf.py, test_hf_import.py): generated text, a tiny
FWL config on it, a 2-step single-process run to export, and the relative error the logits are held to."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from fwl_scale.config import load_config
from fwl_scale.data import prepare_data
from fwl_scale.data.tokenizer import Tokenizer
from fwl_scale.train.loop import Trainer
from tests.train_support import REPO

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
