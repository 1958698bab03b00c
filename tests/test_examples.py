"""Every script in examples/ is listed here and runs with tiny arguments."""

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMOKE_ARGS = {
    "vae_digits.py": ["--num-epochs", "2", "--quiet"],
    "benchmark_elbo.py": ["--rounds", "1", "--steps", "2"],
    "sir_epidemic.py": ["--num-simulations", "300", "--max-epochs", "2", "--quiet"],
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


def test_sir_epidemic(tmp_path):
    pytest.importorskip("matplotlib")
    module = load("sir_epidemic.py")
    args = module.parse_args(SMOKE_ARGS["sir_epidemic.py"] + ["--out", str(tmp_path)])
    results = module.main(args)
    assert (tmp_path / "sir_epidemic.png").stat().st_size > 0
    assert results["epochs"] == 2 and 0.0 <= results["coverage_90"] <= 1.0
