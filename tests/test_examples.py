"""Every script in examples/ is listed here and runs with tiny arguments."""

import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMOKE_ARGS = {
    "vae_digits.py": ["--num-epochs", "2", "--quiet"],
    "benchmark_elbo.py": ["--rounds", "1", "--steps", "2"],
    "benchmark_flow_draws.py": [
        "--draws",
        "500",
        "--latent-dim",
        "3",
        "--rounds",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
    ],
    "benchmark_sequential.py": [
        "--tasks",
        "two_moons",
        "--budgets",
        "200",
        "--rounds",
        "2",
        "--first-round",
        "120",
        "--observations",
        "1",
        "--c2st-samples",
        "100",
        "--threshold-samples",
        "2000",
        "--retrain",
        "last",
    ],  # fmt: skip
    "sequential_inference.py": ["--num-simulations", "300", "--rounds", "2", "--quiet"],
    "benchmark_devices.py": [
        "--batch",
        "64",
        "--simulations",
        "100",
        "--c2st-samples",
        "50",
        "--rounds",
        "1",
    ],  # fmt: skip
    "sir_epidemic.py": ["--num-simulations", "300", "--max-epochs", "2", "--quiet"],
    "explaining_away.py": [
        "--num-data",
        "200",
        "--batch-size",
        "64",
        "--num-steps",
        "3",
        "--quiet",
    ],
    "implicit_likelihood.py": [
        "--num-steps",
        "3",
        "--num-data",
        "300",
        "--grid",
        "40",
        "--warmup-steps",
        "2",
        "--quiet",
    ],
    "calibration.py": [
        "--num-simulations",
        "300",
        "--num-posterior-samples",
        "9",
        "--num-steps",
        "5",
    ],
    "benchmark_forward_kl.py": ["--csis-seconds", "0.5", "--rounds", "1", "--steps", "2"],
    "distributed_training.py": ["--steps", "5", "--num-particles", "16"],
    "benchmark_simulation.py": [
        "--num-simulations",
        "200",
        "--workers",
        "1",
        "--rounds",
        "1",
        "--train-steps",
        "2",
        "--particles",
        "20",
    ],
    "benchmark_sbi.py": [
        "--tasks",
        "two_moons",
        "--budgets",
        "300",
        "--seeds",
        "0",
        "1",
        "--observations",
        "1",
        "--fresh-seconds",
        "1",
        "--c2st-samples",
        "200",
        "--flow",
        "maf",
    ],
}


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(SMOKE_ARGS)


def load(name):
    sys.path.insert(0, str(EXAMPLES))
    try:
        return __import__(name.removesuffix(".py"))
    finally:
        sys.path.remove(str(EXAMPLES))


def test_vae_digits(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    module = load("vae_digits.py")
    results = module.main(module.parse_args(SMOKE_ARGS["vae_digits.py"] + ["--out", str(tmp_path)]))
    assert (tmp_path / "vae_digits.png").stat().st_size > 0
    # The printed decomposition is consistent, and the IW estimate is at least the ELBO
    # (up to its Monte-Carlo error).
    assert results["rate"] == pytest.approx(
        results["mutual_information"] + results["marginal_kl"], abs=1e-4
    )
    assert results["log_evidence_iw256"] > results["elbo"] - 0.05


def test_benchmark_elbo(capsys):
    module = load("benchmark_elbo.py")
    medians = module.main(module.parse_args(SMOKE_ARGS["benchmark_elbo.py"]))
    assert set(medians) == {"Trace_ELBO", "JointContrastiveELBO", "PyTorch (hand-written)"}
    assert "/ Trace_ELBO" in capsys.readouterr().out


def test_benchmark_flow_draws(capsys):
    module = load("benchmark_flow_draws.py")
    medians = module.main(module.parse_args(SMOKE_ARGS["benchmark_flow_draws.py"]))
    assert len(medians) == 6 and all(ms > 0 for ms in medians.values())
    assert "sample_and_log_prob" in capsys.readouterr().out


def test_sir_epidemic(tmp_path):
    pytest.importorskip("matplotlib")
    module = load("sir_epidemic.py")
    args = module.parse_args(SMOKE_ARGS["sir_epidemic.py"] + ["--out", str(tmp_path)])
    results = module.main(args)
    assert (tmp_path / "sir_epidemic.png").stat().st_size > 0
    assert results["epochs"] == 2 and 0.0 <= results["coverage_90"] <= 1.0


def test_benchmark_forward_kl(capsys):
    module = load("benchmark_forward_kl.py")
    results = module.main(module.parse_args(SMOKE_ARGS["benchmark_forward_kl.py"]))
    assert results["csis"]["target_kl"] > 0 and results["step"]["ratio"] > 0
    out = capsys.readouterr().out
    assert "CSIS vs ForwardKL" in out and "ratio ForwardKL / PyTorch" in out


@pytest.mark.slow
def test_benchmark_sbi(tmp_path, capsys):
    pytest.importorskip("sbi")
    pytest.importorskip("sbibm")
    module = load("benchmark_sbi.py")
    args = module.parse_args(SMOKE_ARGS["benchmark_sbi.py"] + ["--out", str(tmp_path)])
    bank, fresh = module.main(args)
    assert [row["seed"] for row in bank] == [0, 1]
    for side in ("pyro_jc", "sbi"):
        assert 0.0 <= bank[0][side]["c2st"][0] <= 1.0
    assert [row["seed"] for row in fresh] == [0, 1]
    assert fresh[0]["pyro_jc"]["simulations"] > 0
    assert (tmp_path / "results.json").exists()
    out = capsys.readouterr().out
    assert "Fresh-simulation mode" in out
    assert re.search(r"two_moons +300 +2 ", out)  # one line for both seeds
    assert re.search(r"two_moons +1 +2 ", out)  # fresh mode too


@pytest.mark.slow
def test_explaining_away(tmp_path):
    pytest.importorskip("matplotlib")
    module = load("explaining_away.py")
    args = module.parse_args(SMOKE_ARGS["explaining_away.py"] + ["--out", str(tmp_path)])
    results = module.main(args)
    assert (tmp_path / "explaining_away.png").stat().st_size > 0
    assert results["x"] == [-2.0, 0.0, 2.0] and "kl" in results["diagnostics"]


@pytest.mark.slow
def test_explaining_away_fit_matches_the_exact_posterior(tmp_path):
    # Full run (3000 steps, learning rate decayed tenfold). Measured on seeds 0 and 1: mean
    # error <= 0.09 posterior sd, sds within 5.4%, correlation within 0.011 of -0.92.
    pytest.importorskip("matplotlib")
    module = load("explaining_away.py")
    results = module.main(module.parse_args(["--quiet", "--out", str(tmp_path)]))
    assert results["max_mean_error_sd"] < 0.2
    assert results["max_sd_error"] < 0.10
    assert results["max_corr_error"] < 0.03


def test_implicit_likelihood(tmp_path):
    pytest.importorskip("matplotlib")
    module = load("implicit_likelihood.py")
    args = module.parse_args(SMOKE_ARGS["implicit_likelihood.py"] + ["--out", str(tmp_path)])
    results = module.main(args)
    assert (tmp_path / "implicit_likelihood.png").stat().st_size > 0
    for rows in results["results"].values():
        for method in ("ForwardKL", "AdversarialELBO"):
            assert rows[method]["kl_exact_to_guide"] >= -1e-3  # quadrature KLs are KLs
            assert rows[method]["kl_guide_to_exact"] >= -1e-3


def test_calibration(tmp_path):
    pytest.importorskip("matplotlib")
    module = load("calibration.py")
    args = module.parse_args(SMOKE_ARGS["calibration.py"] + ["--out", str(tmp_path)])
    results = module.main(args)
    assert (tmp_path / "calibration.png").stat().st_size > 0
    assert not results["scale halved"].passes(0.01)  # 300 simulations already see it


def test_distributed_training_in_one_process(capsys):
    """Without torchrun it trains in one process (the two-process run is in
    tests/test_distributed.py)."""
    module = load("distributed_training.py")
    module.main(module.parse_args(SMOKE_ARGS["distributed_training.py"]))
    processes, pairs, steps, *_ = capsys.readouterr().out.splitlines()[-1].split()
    assert (processes, pairs, steps) == ("1", "16", "5")


def test_benchmark_simulation(capsys):
    pytest.importorskip("sbi")
    module = load("benchmark_simulation.py")
    rows = module.main(module.parse_args(SMOKE_ARGS["benchmark_simulation.py"]))
    assert [row[0] for row in rows] == [1] and all(t > 0 for t in rows[0][1:])
    assert re.search(r"^ +1 +[\d.]+ +[\d.]+ +[\d.]+$", capsys.readouterr().out, re.M)


def test_benchmark_devices(capsys):
    """The CPU-vs-GPU table: a row per case, the CUDA column filled where a GPU is."""
    module = load("benchmark_devices.py")
    module.main(module.parse_args(SMOKE_ARGS["benchmark_devices.py"]))
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 3
    for row in rows:
        cpu, cuda, ratio = row.split()[-3:]
        assert float(cpu) > 0 and (cuda != "-") == torch.cuda.is_available()


@pytest.mark.slow
# sbi's sequential methods: nflows' deprecated triangular_solve, sbi's rejection notes.
@pytest.mark.filterwarnings("ignore::UserWarning:nflows.*")
@pytest.mark.filterwarnings("ignore::UserWarning:sbi.*")
def test_benchmark_sequential(tmp_path, capsys):
    pytest.importorskip("sbi")
    pytest.importorskip("sbibm")
    module = load("benchmark_sequential.py")
    args = module.parse_args(SMOKE_ARGS["benchmark_sequential.py"] + ["--out", str(tmp_path)])
    rows = module.main(args)
    assert len(rows) == 1 and set(module.METHODS) <= set(rows[0])
    assert all(0.0 <= rows[0][m]["c2st"] <= 1.0 for m in module.METHODS)
    # --retrain last: the second of two rounds starts from fresh weights, and the row says so
    tsnpe, npe = rows[0]["pyro_jc TSNPE"], rows[0]["pyro_jc NPE"]
    assert tsnpe["retrained"] == [2] and len(tsnpe["epochs"]) == 2
    assert tsnpe["simulations"] == [120, 80] and npe["simulations"] == [200]  # --first-round 120
    assert len(tsnpe["acceptance_rates"]) == 1 and 0 < tsnpe["acceptance_rates"][0] <= 1
    assert npe["acceptance_rates"] == [] and len(npe["epochs"]) == 1
    assert "Mean C2ST" in capsys.readouterr().out and (tmp_path / "results.json").exists()


def test_benchmark_sequential_first_round_splits_the_budget(capsys):
    module = load("benchmark_sequential.py")
    assert module.round_sizes(2000, 10) == [200] * 10
    assert module.round_sizes(2000, 10, 500) == [500] + [167] * 6 + [166] * 3
    assert sum(module.round_sizes(2000, 10, 500)) == 2000
    assert module.round_sizes(10000, 1, 500) == [10000]  # one round: the whole budget
    for first in (0, 192):  # nothing on the prior; a later round left empty
        with pytest.raises(SystemExit):
            module.parse_args(["--budgets", "200", "--first-round", str(first)])
        assert "pass 1 to 191" in capsys.readouterr().err


def test_sequential_inference(tmp_path):
    pytest.importorskip("matplotlib")
    module = load("sequential_inference.py")
    args = module.parse_args(SMOKE_ARGS["sequential_inference.py"] + ["--out", str(tmp_path)])
    history, snapshots, p_here, p_far = module.main(args)
    assert [r["simulations"] for r in history["rounds"]] == [150, 150]
    assert 0 < history["rounds"][1]["acceptance_rate"] <= 1 and len(snapshots) == 2
    assert 0 < p_here <= 1 and 0 < p_far <= 1
    assert (tmp_path / "sequential_rounds.png").exists()
