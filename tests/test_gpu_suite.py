"""bench/gpu_suite.sh: its logic on CPU (`--device cpu --smoke`: every benchmark at tiny shapes, torch.compile's
eager backend), the one results file with every section, and its refusals of bad arguments."""
from __future__ import annotations

import re
import subprocess

import pytest
import torch

from fwl_scale.config import Config
from fwl_scale.device import matmul_precision, resolve_device
from tests.train_support import REPO, fwl_env

SUITE = REPO / "bench" / "gpu_suite.sh"
SECTIONS = ["machine", "train_step", "attention", "fwl_op", "parallel", "cp"]


def run_suite(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUITE), *args], cwd=REPO, env=fwl_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_writes_every_section(tmp_path):
    out = tmp_path / "results" / "suite.md"
    proc = run_suite("--device", "cpu", "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:] + (out.read_text()[-3000:] if out.exists() else "")
    assert not out.with_name(out.name + ".partial").exists()  # moved into place when complete
    text = out.read_text()
    headings = re.findall(r"^## (\w+)$", text, flags=re.M)
    assert headings == SECTIONS
    assert "FAILED" not in text and "skipped" not in text
    sections = dict(zip(SECTIONS, re.split(r"^## \w+$", text, flags=re.M)[1:]))
    for name, body in sections.items():
        assert "load average before/after:" in body, name
    step = sections["train_step"]
    for shape in ("125m", "1b"):
        for head in ("FWL", "baseline"):
            for mode in ("eager", "compiled"):
                row = rf"^{shape}\s+{head}\s+{mode}\s+dense\s+32\s+2\s"  # the default kernel: the dense mask
                assert re.search(row, step, flags=re.M), (shape, head, mode)
        assert re.search(rf"^{shape} compiled: FWL / baseline .* analytic FLOPs", step, flags=re.M)
    # model.attention=dense and auto on packed documents; on CPU auto runs the dense mask too.
    attention = sections["attention"]
    assert "documents of mean length 32" in attention
    for head in ("FWL", "baseline"):
        for kernel in ("dense", "auto:dense"):
            assert re.search(rf"^125m\s+{head}\s+eager\s+{kernel}\s+128\s+2\s", attention, flags=re.M), (head, kernel)
    assert re.search(r"^125m eager \(auto:dense attention\): FWL / baseline", attention, flags=re.M)
    assert re.search(r"^\s+32\s+[\d.]+\s+[\d.]+", sections["fwl_op"], flags=re.M)  # a row per T
    assert "dp=2 ZeRO-1" in sections["parallel"] and "collectives per step" in sections["parallel"]
    assert "state/unsplit" in sections["cp"]


@pytest.mark.parametrize("args,message", [(("--device", "tpu"), "--device must be cuda or cpu, got 'tpu'"),
                                          (("--frobnicate",), "unknown argument '--frobnicate'")])
def test_bad_arguments_are_refused(tmp_path, args, message):
    out = tmp_path / "suite.md"
    proc = run_suite(*args, "--out", str(out), timeout=60)
    assert proc.returncode == 2 and message in proc.stderr
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_device_is_refused(tmp_path):
    out = tmp_path / "suite.md"
    proc = run_suite("--out", str(out), timeout=120)
    assert proc.returncode == 2 and "torch sees no CUDA device" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("device,tf32,want", [("cuda", True, "high"), ("cuda", False, "highest"), ("cpu", True, None)])
def test_tf32_is_a_cuda_setting(device, tf32, want):
    cfg = Config()
    cfg.train.tf32 = tf32
    assert matmul_precision(cfg, torch.device(device)) == want
    if device == "cpu":
        before = torch.get_float32_matmul_precision()
        cfg.train.device = "cpu"
        assert resolve_device(cfg) == torch.device("cpu")
        assert torch.get_float32_matmul_precision() == before  # the CPU keeps torch's default
