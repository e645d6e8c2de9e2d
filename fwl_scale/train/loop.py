"""The training loop: one DeepSpeed engine for one process or many (tp × cp × dp × pp: the plain engine
for pp = 1, the pipeline engine for pp > 1, train/engine.py), validation, metrics, atomic
checkpoints with exact resume (and layout-free ones from `fwl ckpt convert`), non-finite-loss skipping,
and stop-on-signal.

    trainer = Trainer(cfg)          # process group, data, model, engine, resume
    code = trainer.run()            # 0 when done, EXIT_REQUEUE when stopped on request (checkpoint saved)
"""
from __future__ import annotations

import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from fwl_scale.atomic import atomic_write_text
from fwl_scale.checkpoint.native import (CheckpointError, CheckpointManager, CheckpointRef, SkippedCheckpoint,
                                         check_compatible, resolve_checkpoint)
from fwl_scale.checkpoint.universal import load_universal
from fwl_scale.config import Config, ConfigError, dump_config
from fwl_scale.data import TrainLoader, prepare_data, valid_batches
from fwl_scale.eval.perplexity import EvalResult, evaluate_batches
from fwl_scale.model.flops import train_flops_per_token
from fwl_scale.parallel import init_parallel_state
from fwl_scale.parallel.world import LongWait
from fwl_scale.signal_points import signal_point
from fwl_scale.train.carried import CarriedState, carries_state
from fwl_scale.train.distributed import DistInfo, init_distributed, quiet_deepspeed
from fwl_scale.train.engine import StepStats, TrainingError, build_training_engine
from fwl_scale.train.metrics import MetricsLog, Throughput, device_name, efficiency, peak_tflops
from fwl_scale.train.signals import EXIT_REQUEUE, StopRequest, stop_file_path

log = logging.getLogger("fwl_scale.train")


@dataclass
class TrainState:
    """What the loop itself carries across a checkpoint (the engine holds model/optimizer/scheduler)."""

    step: int = 0  # completed training steps (including skipped ones)
    tokens: int = 0  # tokens consumed
    skipped_total: int = 0
    nonfinite_in_row: int = 0
    last_eval: dict[str, Any] = field(default_factory=dict)


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds everything for `cfg` and trains. `resume`: continue from the latest complete checkpoint
    in train.out_dir if there is one. `resume_from`: a specific checkpoint (a run dir, its checkpoints/
    dir or a step_* dir) to start from, allowed only into an out_dir without checkpoints of its own.
    `after_step(trainer, stats)`: called on every rank after each step (tests, embedding apps)."""

    def __init__(self, cfg: Config, resume: bool = True, resume_from: str | Path | None = None,
                 after_step: Callable[["Trainer", StepStats], None] | None = None,
                 stop: StopRequest | None = None):
        self.cfg = cfg
        self.after_step = after_step
        self.dist: DistInfo = init_distributed(cfg)
        quiet_deepspeed()
        self.device = self.dist.device
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt = CheckpointManager(self.out_dir, cfg.train.keep_last, self.dist.rank)
        # Decide what to resume from, and refuse bad checkpoints, before anything is written.
        self.resume_ref = self._choose_checkpoint(resume, resume_from)
        if stop is None:
            stop = StopRequest().install()
        stop.stop_file = stop_file_path(self.out_dir)  # (installed by `fwl train` before any heavy import)
        self.stop = stop
        try:
            self._build()
        except BaseException:
            self.stop.uninstall()
            raise

    # ----------------------------------------------------------------------------------- set-up
    def _choose_checkpoint(self, resume: bool, resume_from: str | Path | None) -> CheckpointRef | None:
        """The checkpoint to start from, its files verified against their checksums by all ranks together.
        Resuming a run takes its newest intact checkpoint: damaged newer ones are skipped with a warning
        and set aside, so a requeued job goes on instead of failing on them forever. A checkpoint named
        with --resume-from is used as it is or refused, never replaced."""
        self.skipped_checkpoints: list[SkippedCheckpoint] = []
        verified = True
        if resume_from is not None:
            own = self.ckpt.latest()
            ref = resolve_checkpoint(resume_from, verify=False)  # verified below, by all ranks together
            if own is not None and own.path.resolve() != ref.path.resolve():
                raise CheckpointError(f"train.out_dir {self.out_dir} already holds checkpoints (latest {own.path}); "
                                      f"resuming it from {ref.path} would mix two runs; choose another out_dir")
            verified = self.ckpt.verify(ref)
        elif resume:
            point = self.ckpt.resume_point()
            ref, verified, self.skipped_checkpoints = point.ref, point.verified, point.skipped
        else:
            own = self.ckpt.latest()
            if own is not None:
                raise CheckpointError(f"train.out_dir {self.out_dir} already holds checkpoints (latest {own.path}) "
                                      "and resuming is disabled; choose another train.out_dir or remove them")
            ref = None
        if ref is not None:
            check_compatible(ref, self.cfg, dp=self.dist.dp)
        if self.dist.is_main:
            for s in self.skipped_checkpoints:
                print(f"fwl train: warning: checkpoint {s.path} is damaged: {s.problem}. Skipped: resuming from "
                      f"{ref.path} (step {ref.step}) instead. The damaged checkpoint is kept as {s.kept_as} for "
                      "inspection; nothing reads it, remove it when done.", file=sys.stderr, flush=True)
            if ref is not None and not verified:
                print(f"fwl train: note: checkpoint {ref.path} has no checksums (saved before fwl_scale recorded "
                      "them); it is loaded unverified", file=sys.stderr, flush=True)
        return ref

    def _build(self) -> None:
        cfg, dist = self.cfg, self.dist
        # Tokenizer and shards: rank 0 builds them (idempotent), the others wait and then only find them.
        # A failure on rank 0 is shared, so the other ranks stop too instead of waiting for it forever.
        wait = LongWait(cfg.train.data_prep_timeout_s)
        failure: Exception | None = None
        if dist.is_main:
            try:
                self.paths = prepare_data(cfg)
                signal_point("data_ready")
            except Exception as e:
                failure = e
        failed = wait.any(failure is not None)
        if failure is not None:
            raise failure
        if failed:
            raise ConfigError(f"rank {dist.rank}: data preparation failed on rank 0 (its error says why)")
        if not dist.is_main:
            self.paths = prepare_data(cfg)

        # The process groups of the layout (tp, cp, dp, pp; docs/design.md §3.4). Context-parallel peers get the same
        # data (the same dp rank) and each keeps its chunk of every sequence (the model slices it).
        self.parallel = init_parallel_state(cfg)
        _seed_everything(cfg.train.seed)  # the same initial weights on every rank (DeepSpeed broadcasts too)
        # tp/cp: the plain engine with our groups as its mpu; pp > 1: the pipeline engine (engine.py).
        self.te = build_training_engine(cfg, self.parallel, dist)
        self.param_counts = self.te.model.param_counts()
        self.engine, self.scheduler = self.te.engine, self.te.scheduler

        ps = self.parallel
        dp_rank = ps.dp_rank
        self.loader = TrainLoader(cfg, self.paths, dp_rank, dist.dp)
        # Contiguous mode: the FWL state carried from micro-batch to micro-batch (train/carried.py), held
        # (and saved) where the FWL runs: every rank, or a pipeline's last stage.
        self.carried = CarriedState(carries_state(cfg) and self.te.is_last_stage, cfg.parallel.micro_batch, dp_rank,
                                    dist.dp, ps.tp_rank, ps.tp_size, ps.cp_rank)
        self.state = TrainState()
        client: dict[str, Any] = {}
        if self.resume_ref is not None:
            if self.resume_ref.meta.get("universal"):
                # Converted by `fwl ckpt convert`: loads into this layout, whatever the source's was.
                client = load_universal(self.te, self.resume_ref)
            else:
                client = self.ckpt.load(self.engine, self.resume_ref)
            self._restore(client)
        self.metrics = MetricsLog(cfg, self.out_dir, dist.is_main, run_id=client.get("wandb_run_id"))
        # train.eval_batches micro-batches of validation rows in all, shared by the data-parallel ranks
        # (rounded up to a multiple of dp), so the validation set does not grow with dp.
        per_rank = -(-cfg.train.eval_batches // dist.dp)
        self.valid = valid_batches(cfg, self.paths, per_rank, dp_rank, dist.dp)

        self.flops = train_flops_per_token(cfg.model)
        self.peak = peak_tflops(self.device, cfg.train.peak_tflops)
        p = cfg.parallel
        self.tokens_per_step = p.micro_batch * p.grad_accum * dist.dp * cfg.model.seq_len
        if dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / "config.yaml", dump_config(cfg))

    def _restore(self, client: dict[str, Any]) -> None:
        ref = self.resume_ref
        assert ref is not None
        s = client["fwl_step"]
        self.state = TrainState(step=int(s["step"]), tokens=int(s["tokens"]), skipped_total=int(s["skipped_total"]),
                                nonfinite_in_row=int(s["nonfinite_in_row"]), last_eval=s.get("last_eval", {}))
        try:
            self.loader.load_state_dict(client["data"])
        except Exception as e:  # the loader names what does not fit; say which checkpoint it came from
            raise CheckpointError(f"checkpoint {ref.path}: its data-loader state does not fit this data: "
                                  f"{e}") from None
        try:
            self.carried.load(ref.path, self.device)
        except Exception as e:
            raise CheckpointError(f"checkpoint {ref.path}: {e}") from None
        rng = client.get("rng") or []
        if len(rng) == self.dist.world_size:
            _set_rng_state(rng[self.dist.rank])
        else:  # another world size: fresh, deterministic streams per rank
            _seed_everything(self.cfg.train.seed + 1_000_003 * self.state.step + self.dist.rank)

    # ------------------------------------------------------------------------------------ a step
    def train_step(self) -> StepStats:
        """One optimizer step over grad_accum micro-batches; a step with a non-finite loss on any rank is
        skipped on every rank (the engine's train_step, train/engine.py)."""
        return self.te.train_step(self.loader.next_batch, self.carried, self.stop.local)

    # ------------------------------------------------------------------------------ validation
    def evaluate(self) -> EvalResult:
        ps = self.parallel
        # One rank per data-parallel replica adds its rows: tp and cp peers hold the same per-token losses
        # (cp after the gather), a pipeline's losses are on its last stage.
        contributes = ps.tp_rank == 0 and ps.cp_rank == 0 and self.te.is_last_stage
        forward = self.te.eval_forward(self.valid)
        module = self.engine.module
        module.eval()
        try:
            result = evaluate_batches(forward, self.valid, self.cfg.train.position_buckets, self.device,
                                      contributes=contributes)
        finally:
            module.train()
        return result

    # ------------------------------------------------------------------------------ checkpoints
    def save(self) -> CheckpointRef:
        ranks_rng = [None] * self.dist.world_size
        if torch.distributed.is_initialized() and self.dist.world_size > 1:
            torch.distributed.all_gather_object(ranks_rng, _rng_state())
        else:
            ranks_rng = [_rng_state()]
        s = self.state
        client = {
            "fwl_step": {"step": s.step, "tokens": s.tokens, "skipped_total": s.skipped_total,
                         "nonfinite_in_row": s.nonfinite_in_row, "last_eval": s.last_eval},
            "data": self.loader.state_dict(),
            "rng": ranks_rng,
            "wandb_run_id": self.metrics.run_id,
            "config": self.cfg.to_dict(),
        }
        return self.ckpt.save(self.engine, s.step, client, self.cfg, self.dist.dp, write_extra=self.carried.save)

    # ------------------------------------------------------------------------------------ loop
    def run(self) -> int:
        """Trains to train.steps. Returns 0 when done, EXIT_REQUEUE after a stop request (a checkpoint
        of the step reached is saved first). Raises TrainingError when the loss stays non-finite."""
        try:
            code = self._run()
        finally:
            self.stop.uninstall()
            close = getattr(self.loader, "close", None)
            if callable(close):
                close()
            self.metrics.close()
        if code == 0 and self.dist.is_main:
            # Last, after wandb's summary: what a new user looks for when the run ends.
            print(self.finished_line(), flush=True)
        return code

    def finished_line(self) -> str:
        ckpt = self.ckpt.latest()
        where = f"checkpoint {ckpt.path}" if ckpt is not None else "no checkpoint"
        return (f"fwl train: done at step {self.state.step}: {where}, metrics {self.metrics.path}; next: "
                f"fwl eval {self.out_dir / 'config.yaml'} {self.out_dir}")

    def _progress(self):
        """The progress bar on an interactive terminal; where stderr is not one (a Slurm log), no bar
        (a redrawn bar there is one line per step) — `_run` prints a plain line every train.log_every
        steps instead."""
        self.plain_log = self.dist.is_main and not _is_tty(sys.stderr)
        return tqdm(total=self.cfg.train.steps, initial=self.state.step,
                    disable=not self.dist.is_main or self.plain_log, desc=self.cfg.name, dynamic_ncols=True,
                    unit="step")

    def _layout_text(self) -> str:
        lay = self.parallel.layout
        sp = " +SP" if self.parallel.sequence_parallel else ""
        return f"tp={lay.tp}{sp} cp={lay.cp} dp={lay.dp} pp={lay.pp}"

    def _say(self, message: str) -> None:
        """A line on the main rank's stdout that does not break the progress bar."""
        if self.dist.is_main:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def _eval_and_log(self) -> None:
        if not self.valid:
            if self.dist.is_main and not getattr(self, "_warned_no_valid", False):
                self._say("no validation data (data.valid empty and data.valid_fraction = 0): validation skipped")
            self._warned_no_valid = True
            return
        result = self.evaluate()
        self.state.last_eval = result.as_dict()
        self.metrics.log("valid", self.state.step, result.as_dict())
        if self.dist.is_main:
            buckets = " ".join(f"{x:.3f}" for x in result.bucket_loss)
            self._say(f"[step {self.state.step}] validation loss {result.loss:.4f} perplexity "
                      f"{result.perplexity:.3f} | loss by position bucket: {buckets}")

    def _run(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        st = self.state
        if self.dist.is_main:
            pc = self.param_counts
            mfu_note = "" if self.peak else " (MFU n/a: no peak for this device; set train.peak_tflops)"
            print(f"fwl train {cfg.name}: {pc['total'] / 1e6:.2f}M parameters (body {pc['body'] / 1e6:.2f}M, FWL "
                  f"{pc['fwl'] / 1e6:.2f}M, embeddings {pc['embeddings'] / 1e6:.2f}M) | {self.dist.world_size} rank(s) "
                  f"({self._layout_text()}) on {device_name(self.device)} | ZeRO {cfg.parallel.zero_stage}{' bf16' if t.bf16 else ''} | "
                  f"{self.flops.total / 1e6:.2f} MFLOP/token{mfu_note}"
                  + (f" | resumed from {self.resume_ref.path} (step {st.step})" if self.resume_ref else ""),
                  flush=True)
        self.metrics.log("start", st.step, {"resumed_from": str(self.resume_ref.path) if self.resume_ref else None,
                                            "skipped_checkpoints": [{"path": str(s.path), "problem": s.problem,
                                                                     "kept_as": str(s.kept_as)}
                                                                    for s in self.skipped_checkpoints],
                                            "params": self.param_counts, "world_size": self.dist.world_size,
                                            "layout": self.parallel.layout.sizes(),
                                            "flops_per_token": self.flops.total, "device": device_name(self.device)})
        # A stop request that arrived during set-up counts at the first boundary.
        if st.step < t.steps and self.stop.should_stop(self.device):
            return self._stop_and_save()
        bar = self._progress()
        meter = Throughput()
        window_losses: list[float] = []
        last_saved = self.resume_ref.step if self.resume_ref else -1
        try:
            while st.step < t.steps:
                stats = self.train_step()
                st.step += 1
                st.tokens += self.tokens_per_step
                meter.add(self.tokens_per_step)
                if stats.skipped:
                    st.skipped_total += 1
                    st.nonfinite_in_row += 1
                    self._say(f"[step {st.step}] non-finite loss: step skipped "
                              f"({st.nonfinite_in_row} in a row, {st.skipped_total} in total)")
                    self.metrics.log("skip", st.step, {"nonfinite_in_row": st.nonfinite_in_row,
                                                       "skipped_total": st.skipped_total})
                    if st.nonfinite_in_row >= t.max_nonfinite_in_row:
                        raise TrainingError(
                            f"the loss was not finite in {st.nonfinite_in_row} steps in a row (up to step "
                            f"{st.step}, train.max_nonfinite_in_row={t.max_nonfinite_in_row}); stopping. The last "
                            f"checkpoint is in {self.ckpt.root}; lower train.lr, check the data, or try bf16=false")
                else:
                    st.nonfinite_in_row = 0
                    window_losses.append(stats.loss)
                if self.after_step is not None:
                    self.after_step(self, stats)
                bar.update(1)
                if not stats.skipped:
                    bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
                if st.step % t.log_every == 0 or st.step == t.steps:
                    tps, step_s = meter.report()
                    tflops, mfu = efficiency(tps, self.flops.total, self.dist.world_size, self.peak)
                    record = {"loss": stats.loss, "loss_avg": float(np.mean(window_losses)) if window_losses else None,
                              "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens_per_s": tps,
                              "step_time_s": step_s, "tflops_per_device": tflops, "mfu": mfu,
                              "tokens": st.tokens, "skipped_total": st.skipped_total}
                    self.metrics.log("train", st.step, record)
                    window_losses = []
                    bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{tps:,.0f}",
                                    mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%")
                    if self.plain_log:
                        gn = "n/a" if stats.grad_norm is None else f"{stats.grad_norm:.3f}"
                        self._say(f"[step {st.step}/{t.steps}] loss {stats.loss:.4f} lr {stats.lr:.3g} "
                                  f"grad_norm {gn} | {tps:,.0f} tok/s, {step_s:.3f} s/step, {tflops:.3g} TFLOP/s "
                                  f"per device, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
                if stats.stop and st.step < t.steps:  # at the last step: just finish
                    bar.close()
                    return self._stop_and_save()
                busy = False
                if st.step % t.eval_every == 0 or st.step == t.steps:
                    self._eval_and_log()
                    busy = True
                if st.step % t.save_every == 0 or st.step == t.steps:
                    self.save()
                    last_saved = st.step
                    busy = True
                if busy:
                    meter.restart()
        finally:
            bar.close()
        if last_saved != st.step:
            self.save()
        return 0

    def _stop_and_save(self) -> int:
        reason = self.stop.local_reason or "another rank"
        ref = self.save()
        if self.dist.is_main:
            self.stop.clear_stop_file()
            print(f"stop requested ({reason}): checkpoint {ref.path} saved at step {self.state.step}; "
                  f"exiting with {EXIT_REQUEUE} so the job is requeued", flush=True)
        self.metrics.log("stop", self.state.step, {"reason": reason, "checkpoint": str(ref.path)})
        return EXIT_REQUEUE


def train(cfg: Config, resume: bool = True, resume_from: str | Path | None = None,
          stop: StopRequest | None = None) -> int:
    """`fwl train`: builds a Trainer and runs it; returns the process exit status."""
    trainer = Trainer(cfg, resume=resume, resume_from=resume_from, stop=stop)
    return trainer.run()
