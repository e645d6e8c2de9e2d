"""The study spec: named variants (config overrides) × seeds × arms {fwl, baseline}, from one YAML file.

    name: recipe                                   # default: the file's stem
    arms: {fwl: configs/tiny.yaml, baseline: configs/base_tiny.yaml}   # either may be omitted
    common: ["train.steps=600"]                    # overrides for every run
    variants:
      plain: {}                                    # no extra overrides
      residual: {fwl: ["model.fwl.residual=true"]} # per arm (an arm not named gets none)
      lr1e-3: ["train.lr=1e-3"]                    # a plain list: both arms
      lr6e-3: {fwl: ["train.lr=6e-3"], baseline: ["train.lr=6e-3"], seeds: [1]}  # a sweep point: fewer seeds
    seeds: [1, 2, 3]                               # train.seed of each run (a variant's own `seeds` wins)
    eval_batches: 40                               # validation batches of the evaluations (default: config's)
    long_docs: {windows: 32, documents: 5}         # also stream whole validation documents (optional)
    rulers:                                        # also `fwl eval --out` on named document sets (optional)
      valid:                                       # the validation documents after the tuning one
        methods: {fwl: [fwl_carried, fwl_reset, slow_head], baseline: [plain, dynamic, continuous_cache]}
        args: ["--max-tokens", "8192"]             # more options of `fwl eval --out`, for every arm
      licenses: {methods: {fwl: [fwl_carried], baseline: [plain]}, args: ["--docs", "runs/licenses.jsonl"]}
    out_dir: runs/study_recipe                     # default: runs/study_<name>

A ruler's `methods` is a mapping arm -> methods (an arm not named is not measured on it) or a list that
every arm runs; the methods are `fwl eval --out`'s (fwl_scale/eval/names.py), each available to its arm.
The study sets --out (OUT/rulers/<ruler>/<run>) and --methods itself, and passes --leave-out-tune-docs,
so that an arm that tunes nothing scores the validation documents the other arm's dynamic evaluation or
cache scores. The table's gains are over the baseline's `plain` on the same ruler, which it then needs.

Relative paths (configs, out_dir) are relative to the working directory, as everywhere in `fwl`.
Every run's config is loaded and validated (`load_config`) before anything trains, so a bad override
fails at once with the variant's name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwl_scale.config import Config, ConfigError, load_config, read_yaml
from fwl_scale.eval.names import METHODS, available_method_names

ARMS = ("fwl", "baseline")
TOP_KEYS = ("name", "arms", "common", "variants", "seeds", "eval_batches", "long_docs", "rulers", "out_dir")
LONG_DOC_KEYS = ("windows", "documents")
RULER_KEYS = ("methods", "args")
# fwl eval options a ruler's args may not hold: those the study sets, and those of fwl eval's other modes.
STUDY_SET_ARGS = ("--out", "--methods")
OTHER_MODE_ARGS = ("--stream", "--compare", "--json", "--batches", "--long-docs", "--max-windows")
# Set by the study itself for every run; a spec that sets them would silently lose them.
RESERVED = ("train.seed", "train.out_dir")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class StudyError(ConfigError):
    """A study spec that cannot be used; the message names the file and the key or variant."""


@dataclass(frozen=True)
class Run:
    """One training run of the study: (variant, arm, seed), numbered in the order of the spec."""
    index: int
    variant: str
    arm: str
    seed: int
    config: str
    overrides: tuple[str, ...]  # common + the variant's for this arm + train.seed (not train.out_dir)

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.arm}-s{self.seed}"


@dataclass(frozen=True)
class Ruler:
    """`fwl eval --out` of every run on one set of documents: each arm's methods (an arm without any is not
    measured on it) and the options every arm's evaluation gets (--docs, --max-tokens, ...)."""
    name: str
    methods: dict[str, tuple[str, ...]]  # arm -> its methods, in the spec's order
    args: tuple[str, ...]

    def measures(self, arm: str) -> dict[str, list[str]] | None:
        """What a run of `arm` is measured with (kept in its result: a change measures it again), or None."""
        if arm not in self.methods:
            return None
        return {"methods": list(self.methods[arm]), "args": list(self.args)}


@dataclass
class StudySpec:
    path: Path
    name: str
    arms: dict[str, str]
    common: list[str]
    variants: dict[str, dict[str, list[str]]]  # variant -> arm -> overrides
    seeds: list[int]
    variant_seeds: dict[str, list[int]]  # variant -> its seeds (the spec's unless the variant names its own)
    out_dir: Path
    eval_batches: int | None = None
    # Stream the first `documents` validation documents that are this long for `windows` windows of
    # seq_len, the FWL state carried and reset (fwl eval --stream); None: not measured.
    long_docs: dict[str, int] | None = None
    rulers: dict[str, Ruler] = field(default_factory=dict)  # name -> ruler, in the spec's order
    runs: list[Run] = field(default_factory=list)  # each distinct run once, in the order of the spec
    members: dict[tuple[str, str], list[Run]] = field(default_factory=dict)  # (variant, arm) -> its runs, by seed

    def run_dir(self, run: Run) -> Path:
        return self.out_dir / "runs" / run.name

    def train_overrides(self, run: Run) -> list[str]:
        return [*run.overrides, f"train.out_dir={self.run_dir(run)}"]

    def run_config(self, run: Run) -> Config:
        return load_config(run.config, self.train_overrides(run))


def _overrides(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StudyError(f"{where}: expected a list of key.sub=value overrides, got {value!r}")
    for v in value:
        key = v.split("=", 1)[0].strip()
        if "=" not in v:
            raise StudyError(f"{where}: override {v!r} is not of the form key.sub=value")
        if key in RESERVED:
            raise StudyError(f"{where}: {key} is set by the study for every run (use `seeds` and `out_dir`)")
    return list(value)


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in value):
        raise StudyError(f"{where}: expected a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise StudyError(f"{where}: {value} repeats a seed")
    return list(value)


def _variant(name: Any, value: Any, arms: dict[str, str], seeds: list[int],
             src: str) -> tuple[dict[str, list[str]], list[int]]:
    """A variant's overrides per arm and its seeds."""
    where = f"{src}: variant {name!r}"
    if not isinstance(name, str) or not _NAME.match(name):
        raise StudyError(f"{where}: a variant name is letters, digits and . _ + - (it names run directories)")
    if value is None or isinstance(value, list):
        both = _overrides(value, where)
        return {arm: list(both) for arm in arms}, seeds
    if not isinstance(value, dict):
        raise StudyError(f"{where}: expected a list of overrides or a mapping arm -> overrides, got {value!r}")
    for key in value:
        if key not in (*ARMS, "seeds"):
            raise StudyError(f"{where}: unknown key {key!r} (an arm: {', '.join(ARMS)}; or seeds)")
        if key in ARMS and key not in arms:
            raise StudyError(f"{where}: overrides for arm {key!r}, which the spec's `arms` does not have")
    own_seeds = _seeds(value["seeds"], f"{where}: seeds") if "seeds" in value else seeds
    return {arm: _overrides(value.get(arm), f"{where}, arm {arm}") for arm in arms}, own_seeds


def _ruler_args(value: Any, where: str) -> tuple[str, ...]:
    # YAML reads `--max-tokens, 8192` as a string and a number: numbers are taken as written.
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                              for a in value):
        raise StudyError(f"{where}: expected a list of fwl eval options (e.g. [--max-tokens, 8192]), got {value!r}")
    args = tuple(str(a) for a in value)
    for i, a in enumerate(args):
        option = a.split("=", 1)[0]
        if option in STUDY_SET_ARGS:
            raise StudyError(f"{where}: {option} is set by the study (--out OUT/rulers/<ruler>/<run>, --methods "
                             f"from the ruler's methods)")
        if option in OTHER_MODE_ARGS:
            raise StudyError(f"{where}: {option} belongs to another mode of fwl eval than --out")
        if option == "--docs":  # its files, up to the next option; checked now, not after hours of training
            files = [a.split("=", 1)[1]] if "=" in a else []
            for f in args[i + 1:]:
                if f.startswith("-"):
                    break
                files.append(f)
            if not files:
                raise StudyError(f"{where}: --docs needs at least one file")
            for f in files:
                if not Path(f).is_file():
                    raise StudyError(f"{where}: --docs: no such file {f}")
    return args


def _ruler(name: Any, value: Any, arms: dict[str, str], src: str) -> Ruler:
    where = f"{src}: rulers.{name}"
    if not isinstance(name, str) or not _NAME.match(name):
        raise StudyError(f"{src}: rulers: a ruler name is letters, digits and . _ + - (it names directories), "
                         f"got {name!r}")
    if not isinstance(value, dict):
        raise StudyError(f"{where}: expected a mapping with keys {', '.join(RULER_KEYS)}, got {value!r}")
    for key in value:
        if key not in RULER_KEYS:
            raise StudyError(f"{where}: unknown key {key!r} (known: {', '.join(RULER_KEYS)})")
    methods = value.get("methods")
    both = isinstance(methods, list)
    if both:
        per_arm = {arm: methods for arm in arms}
    elif isinstance(methods, dict) and methods:
        for arm in methods:
            if arm not in ARMS:
                raise StudyError(f"{where}.methods: unknown key {arm!r} (an arm: {', '.join(ARMS)})")
            if arm not in arms:
                raise StudyError(f"{where}.methods: methods for arm {arm!r}, which the spec's `arms` does not have")
        per_arm = {arm: methods[arm] for arm in arms if arm in methods}
    else:
        raise StudyError(f"{where}.methods: expected a list of fwl eval methods (every arm) or a mapping arm -> "
                         f"list, got {methods!r}")
    parsed = {}
    for arm, names in per_arm.items():
        at = f"{where}.methods" + ("" if both else f".{arm}")
        if not isinstance(names, list) or not names or not all(isinstance(m, str) for m in names):
            raise StudyError(f"{at}: expected a non-empty list of method names, got {names!r}")
        for m in names:
            if m not in METHODS:
                raise StudyError(f"{at}: unknown method {m!r} (fwl eval --out's methods: {', '.join(METHODS)})")
            available = available_method_names(arm == "fwl")
            if m not in available:
                raise StudyError(f"{at}: {m} is not a method of the {arm} arm (its methods: {', '.join(available)})"
                                 + ("; give each arm its own: {fwl: [...], baseline: [...]}" if both else ""))
        if len(set(names)) != len(names):
            raise StudyError(f"{at}: {names} repeats a method")
        parsed[arm] = tuple(names)
    return Ruler(name, parsed, _ruler_args(value.get("args"), f"{where}.args"))


def parse_spec(data: Any, path: Path) -> StudySpec:
    src = str(path)
    if not isinstance(data, dict):
        raise StudyError(f"{src}: top level must be a mapping, got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise StudyError(f"{src}: unknown key {key!r} (known: {', '.join(TOP_KEYS)})")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise StudyError(f"{src}: name: letters, digits and . _ + - only, got {name!r}")
    arms = data.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise StudyError(f"{src}: arms: expected a mapping with fwl and/or baseline -> config file, got {arms!r}")
    for arm, cfg in arms.items():
        if arm not in ARMS:
            raise StudyError(f"{src}: arms: unknown key {arm!r} (known: {', '.join(ARMS)})")
        if not isinstance(cfg, str):
            raise StudyError(f"{src}: arms.{arm}: expected a config file path, got {cfg!r}")
        if not Path(cfg).is_file():
            raise StudyError(f"{src}: arms.{arm}: no such config file {cfg}")
    arms = {arm: arms[arm] for arm in ARMS if arm in arms}  # fixed order: fwl, then baseline
    common = _overrides(data.get("common"), f"{src}: common")
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise StudyError(f"{src}: variants: needs at least one named variant (e.g. `plain: {{}}`), got {variants!r}")
    seeds = _seeds(data.get("seeds", [1]), f"{src}: seeds")
    parsed_with_seeds = {str(k): _variant(k, v, arms, seeds, src) for k, v in variants.items()}
    parsed = {k: per_arm for k, (per_arm, _) in parsed_with_seeds.items()}
    variant_seeds = {k: own for k, (_, own) in parsed_with_seeds.items()}
    eval_batches = data.get("eval_batches")
    if eval_batches is not None and (not isinstance(eval_batches, int) or isinstance(eval_batches, bool)
                                     or eval_batches < 1):
        raise StudyError(f"{src}: eval_batches: expected an integer >= 1, got {eval_batches!r}")
    long_docs = data.get("long_docs")
    if long_docs is not None:
        if not isinstance(long_docs, dict) or set(long_docs) - set(LONG_DOC_KEYS):
            raise StudyError(f"{src}: long_docs: expected a mapping with keys {', '.join(LONG_DOC_KEYS)}, "
                             f"got {long_docs!r}")
        long_docs = {"windows": long_docs.get("windows", 32), "documents": long_docs.get("documents", 5)}
        for key, v in long_docs.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise StudyError(f"{src}: long_docs.{key}: expected an integer >= 1, got {v!r}")
    rulers = data.get("rulers") or {}
    if not isinstance(rulers, dict):
        raise StudyError(f"{src}: rulers: expected a mapping ruler name -> {{methods, args}}, got {rulers!r}")
    rulers = {str(k): _ruler(k, v, arms, src) for k, v in rulers.items()}
    out_dir = data.get("out_dir", f"runs/study_{name}")
    if not isinstance(out_dir, str) or not out_dir:
        raise StudyError(f"{src}: out_dir: expected a directory path, got {out_dir!r}")
    spec = StudySpec(path=path, name=name, arms=arms, common=common, variants=parsed, seeds=seeds,
                     variant_seeds=variant_seeds,
                     out_dir=Path(out_dir), eval_batches=eval_batches, long_docs=long_docs, rulers=rulers)
    # A run that another variant already has (same config, same overrides: e.g. the baseline of a
    # variant that only changes the FWL) is trained once and counted in both variants' rows.
    unique: dict[tuple[str, tuple[str, ...]], Run] = {}
    for variant, per_arm in parsed.items():
        for seed in variant_seeds[variant]:
            for arm, cfg in arms.items():
                overrides = (*common, *per_arm[arm], f"train.seed={seed}")
                run = unique.get((cfg, overrides))
                if run is None:
                    run = unique[(cfg, overrides)] = Run(len(unique), variant, arm, seed, cfg, overrides)
                spec.members.setdefault((variant, arm), []).append(run)
    spec.runs = list(unique.values())
    return spec


def validate_runs(spec: StudySpec) -> dict[str, Config]:
    """Loads every run's config (the whole validation of `fwl train`) before anything trains; returns
    them by run name. An error names the variant and arm."""
    configs = {}
    for run in spec.runs:
        try:
            cfg = spec.run_config(run)
        except ConfigError as e:
            raise StudyError(f"{spec.path}: variant {run.variant!r} (arm {run.arm}, seed {run.seed}): {e}") from None
        if cfg.model.fwl.enabled != (run.arm == "fwl"):
            raise StudyError(f"{spec.path}: variant {run.variant!r}: arm {run.arm} needs model.fwl.enabled="
                             f"{str(run.arm == 'fwl').lower()} ({run.config} with the overrides has "
                             f"{str(cfg.model.fwl.enabled).lower()})")
        configs[run.name] = cfg
    return configs


def load_spec(path: str | Path, validate: bool = True) -> StudySpec:
    p = Path(path)
    data = read_yaml(p, "study spec", StudyError)
    spec = parse_spec(data if data is not None else {}, p)
    if validate:
        validate_runs(spec)
    return spec
