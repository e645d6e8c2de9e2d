"""`fwl study SPEC.yaml`: variants × seeds × {fwl, baseline}, trained and evaluated, collected in one table.

    fwl study SPEC                  every run here, one after another (a finished run only gains the long_docs
                                    or rulers it lacks), then collect
    fwl study SPEC --list           the runs with their index and state
    fwl study SPEC --run INDEX      train and evaluate one run (what each Slurm array task does)
    fwl study SPEC --collect        write OUT/study.md, study.json, loss_by_position.png from the results
    fwl study SPEC --slurm [--sbatch-args ARGS...]   a job array (one task per run) + a collection job

Exit status: 0 every run finished; 1 a run or a measurement of a finished run failed (the others' results
are kept; the table names it); 2 bad spec; 75 stopped by SIGUSR1/SIGTERM after a checkpoint (run again to resume).
"""
from __future__ import annotations

import argparse

from fwl_scale.study import report, runner, slurm, store
from fwl_scale.study.spec import StudyError, load_spec


def _state(spec, run) -> str:
    if store.result_path(spec, run).is_file():
        return "done"
    if store.failure_path(spec, run).is_file():
        return "failed"
    return "started" if (spec.run_dir(run) / "metrics.jsonl").is_file() else "pending"


def _collect(spec) -> int:
    c = report.collect(spec)
    print(f"fwl study {spec.name}: {len(c.complete)}/{len(spec.runs)} runs finished, {len(c.failed)} failed, "
          f"{len(c.missing)} not run -> {spec.out_dir / 'study.md'}")
    for f in c.failed:
        print(f"  failed: {f['run']} (variant {f['variant']}) in {f['stage']}: {f['detail']}; log {f['log']}")
    if c.missing:
        print(f"  not run yet: {', '.join(c.missing)}")
    return 0 if len(c.complete) == len(spec.runs) else runner.EXIT_FAILED


def cmd_study(ns: argparse.Namespace) -> int:
    if ns.sbatch_args and not ns.slurm:
        raise StudyError("--sbatch-args goes with --slurm")
    spec = load_spec(ns.spec)  # every run's config validated before anything else
    if ns.list:
        for run in spec.runs:
            also = [f"{v}/{a}" for (v, a), runs in spec.members.items() if run in runs and v != run.variant]
            print(f"{run.index:>4}  {run.name:<40} {_state(spec, run):<8} {run.config} {' '.join(run.overrides)}"
                  + (f"  (also {', '.join(also)})" if also else ""))
        return 0
    if ns.collect:
        return _collect(spec)
    if ns.slurm:
        array_id, collect_id = slurm.submit(spec, ns.sbatch_args)
        print(f"fwl study {spec.name}: submitted job array {array_id} ({len(spec.runs)} runs, "
              f"{spec.out_dir / 'study.sbatch'}) and collection job {collect_id} (after it ends); "
              f"logs in {spec.out_dir / 'logs'}")
        return 0
    if ns.run is not None:
        if not 0 <= ns.run < len(spec.runs):
            raise StudyError(f"{spec.path}: --run {ns.run}: the study has runs 0..{len(spec.runs) - 1} (see --list)")
        statuses = runner.run_runs(spec, [spec.runs[ns.run]], concurrent=True)
        return runner.exit_status(statuses)
    statuses = runner.run_runs(spec, spec.runs)
    code = runner.exit_status(statuses)
    if code == runner.EXIT_REQUEUE:
        return code
    collected = _collect(spec)
    return code or collected


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="variants × seeds × {fwl, baseline}: train, evaluate, one table",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="the study's YAML spec")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the runs with their index and state")
    mode.add_argument("--run", type=int, metavar="INDEX", help="train and evaluate run INDEX only")
    mode.add_argument("--collect", action="store_true", help="only collect the finished runs' results")
    mode.add_argument("--slurm", action="store_true", help="submit as a Slurm job array + a collection job")
    p.add_argument("--sbatch-args", nargs=argparse.REMAINDER, default=[], metavar="ARG",
                   help="with --slurm: the rest of the line goes to sbatch (e.g. --partition=x --time=2:00:00)")
    p.set_defaults(func=cmd_study)

