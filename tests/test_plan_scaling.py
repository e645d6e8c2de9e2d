"""`fwl scaling grid|fit`: a sizes × budgets × lrs grid turned into a study spec (run by `fwl study`),
its results collected and fitted (fwl_scale/plan/scaling.py). The runs' results are written here from a
known law, as the study's runner writes them, so the collection and the fits are checked against it."""
import json

import pytest
import yaml

from fwl_scale.cli import main
from fwl_scale.plan.fits import Chinchilla
from fwl_scale.study.spec import load_spec

SIZES = {f"s{i}": [f"model.d_model={d}", f"model.n_layers={L}", "model.n_heads=2"]
         for i, (d, L) in enumerate([(32, 1), (48, 2), (64, 2), (96, 3), (128, 4)])}
LAWS = {"baseline": Chinchilla(E=1.8, A=300.0, alpha=0.4, B=900.0, beta=0.35, huber=0.0),
        "fwl": Chinchilla(E=1.7, A=300.0, alpha=0.4, B=900.0, beta=0.35, huber=0.0)}


def _grid(tmp_path, **extra):
    grid = {"name": "t", "arms": {"fwl": "configs/tiny.yaml", "baseline": "configs/base_tiny.yaml"},
            "sizes": SIZES, "tokens_per_param": [2, 8, 32], "lrs": [1e-3, 3e-3], "seeds": [1],
            "out_dir": str(tmp_path / "out"), **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _fake_results(spec, scaling):
    for run in spec.runs:
        cfg = spec.run_config(run)
        n, d = scaling.non_embedding_params(cfg), cfg.train.steps * scaling.tokens_per_step(cfg)
        loss = float(LAWS[run.arm](n, d)) * (1.0 if cfg.train.lr == 3e-3 else 1.05)  # the lr sweep's loser
        path = spec.out_dir / "results" / f"{run.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run": run.name, "run_dir": str(spec.run_dir(run)), "step": cfg.train.steps,
                                    "valid": {"loss": loss}}))


def test_grid_to_study_then_fit_recovers_each_arms_law(tmp_path, capsys):
    from fwl_scale.plan import scaling

    assert main(["scaling", "grid", str(_grid(tmp_path))]) == 0
    spec_path = tmp_path / "grid.study.yaml"
    spec = load_spec(spec_path)  # the study machinery accepts it, every run's config validated
    assert len(spec.runs) == 5 * 3 * 2 * 2
    _fake_results(spec, scaling)
    assert main(["scaling", "fit", str(spec_path)]) == 0
    report = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 0
    assert "FWL gain" in (tmp_path / "out" / "scaling.md").read_text()
    assert len(report["points"]) == 2 * 5 * 3 and all(p["lr"] == 3e-3 for p in report["points"])
    for arm, law in LAWS.items():
        got = report["arms"][arm]["L(N,D)"]
        assert got["E"] == pytest.approx(law.E, rel=0.02) and got["alpha"] == pytest.approx(law.alpha, rel=0.05)
    # The FWL's E is 0.1 lower with the same A, B, exponents: the gain approaches 0.1 at large compute.
    gain = report["gain"]["by_compute"]["baseline_minus_fwl"]
    assert gain[-1] == pytest.approx(0.1, abs=0.01) and set(report["gain"]["by_ladder_size"]) >= {"125m", "13b"}
    # A partial rerun (fewer results) never replaces the fuller collection.
    first = next(spec.out_dir.glob("results/*.json"))
    first.unlink()
    assert main(["scaling", "fit", str(spec_path)]) == 2
    assert "not replaced" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "scaling.json").read_text())["runs"] == 60


def test_a_result_from_another_studys_run_dir_is_refused_naming_it(tmp_path, capsys):
    from fwl_scale.plan import scaling

    main(["scaling", "grid", str(_grid(tmp_path, sizes={"s0": SIZES["s0"]}, tokens_per_param=[2], lrs=[3e-3]))])
    spec = load_spec(tmp_path / "grid.study.yaml")
    _fake_results(spec, scaling)
    path = spec.out_dir / "results" / f"{spec.runs[0].name}.json"
    data = json.loads(path.read_text())
    data["run_dir"] = "/elsewhere/runs/other-study"
    path.write_text(json.dumps(data))
    assert main(["scaling", "fit", str(tmp_path / "grid.study.yaml")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "another study" in err and "/elsewhere/runs/other-study" in err


def test_unknown_grid_key_is_named(tmp_path, capsys):
    assert main(["scaling", "grid", str(_grid(tmp_path, size=["typo"]))]) == 2
    assert "unknown key 'size'" in capsys.readouterr().err
    assert not (tmp_path / "grid.study.yaml").exists()


def test_absolute_token_budgets_are_the_same_for_every_size(tmp_path, capsys):
    from fwl_scale.plan import scaling

    grid = _grid(tmp_path, tokens=[65536, 262144])
    assert main(["scaling", "grid", str(grid)]) == 2  # both budget keys: which one is meant?
    assert "exactly one of tokens_per_param" in capsys.readouterr().err
    data = yaml.safe_load(grid.read_text())
    del data["tokens_per_param"]
    grid.write_text(yaml.safe_dump(data))
    assert main(["scaling", "grid", str(grid)]) == 0
    spec = load_spec(tmp_path / "grid.study.yaml")
    budgets = {(run.variant.split("-")[0], run.variant.split("-")[1]):
               spec.run_config(run).train.steps * scaling.tokens_per_step(spec.run_config(run)) for run in spec.runs}
    assert set(budgets) == {(s, d) for s in SIZES for d in ("d65536", "d262144")}
    assert all(tokens == int(d[1:]) for (_, d), tokens in budgets.items())


def test_fits_the_points_cannot_support_are_flagged():
    from fwl_scale.plan.scaling import fit_warnings

    points = [{"n": n, "d": d, "loss": loss} for n, d, loss in
              [(1e5, 1e6, 5.0), (2e5, 1e6, 4.9), (4e5, 1e6, 5.1), (1e5, 3e6, 4.8), (2e5, 3e6, 4.7), (4e5, 3e6, 4.6)]]
    sound = {"L(N)": {"alpha": 0.3}, "L(N,D)": {"alpha": 0.34, "beta": 0.28}}
    assert fit_warnings(points[3:], sound) == []
    said = fit_warnings(points, {"L(N)": {"error": "too few"}, "L(N,D)": {"alpha": 1.515, "beta": 0.28}})
    assert len(said) == 2 and said[0].startswith("L(N,D): alpha = 1.515 is outside 0.05-1.0")
    assert "rises with N at the same budget in 1 of 4 neighbouring sizes" in said[1]
