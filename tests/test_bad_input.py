"""Bad input gets a clear, early error naming the argument and the remedy."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

from pyro_jc import (
    AdversarialELBO,
    AutoAmortizedFlow,
    AutoAmortizedNormal,
    ForwardKL,
    Implicit,
    JointContrastiveELBO,
    JointContrastiveIWELBO,
    JointContrastiveMeanFieldELBO,
    NonFiniteError,
    ObservationTypeError,
    PlateShapeError,
    SimulatorError,
    UnsampleableSiteError,
    VectorizationWarning,
    simulate,
)
from pyro_jc.diagnostics import c2st, posterior_predictive_check, sbc
from pyro_jc.layout import ModelLayout
from pyro_jc.testing import BetaBernoulliModel, LinearGaussianModel

LOSSES = [
    JointContrastiveELBO,
    JointContrastiveMeanFieldELBO,
    JointContrastiveIWELBO,
    ForwardKL,
    AdversarialELBO,
]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_every_loss_checks_num_particles_in_its_constructor(loss, bad):
    with pytest.raises(ValueError, match=r"num_particles must be a positive integer, got"):
        loss(num_particles=bad)


@pytest.mark.parametrize(
    "loss", [JointContrastiveELBO, JointContrastiveIWELBO], ids=lambda c: c.__name__
)
@pytest.mark.parametrize("bad", ["abc", math.nan, math.inf, [1.0]])
def test_data_entropy_is_a_finite_number(loss, bad):
    with pytest.raises(ValueError, match="data_entropy must be"):
        loss(data_entropy=bad)
    assert loss(data_entropy=3).data_entropy == 3.0


def test_c2st_refuses_broken_input_instead_of_reading_chance():
    """One NaN row made separated samples read 0.50; NaN in Y 0.597; a constant column
    (zero std) 0.50; 1,000 against 50 samples of one distribution 0.95."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(200, 2, generator=g), torch.randn(200, 2, generator=g) + 3.0
    for broken, name in ((X, "X"), (Y, "Y")):
        for value in (math.nan, math.inf):
            corrupted = broken.clone()
            corrupted[7, 1] = value
            args = (corrupted, Y) if name == "X" else (X, corrupted)
            with pytest.raises(ValueError, match=f"1 of the 200 rows of {name}.*row 7"):
                c2st(*args)
    with pytest.raises(ValueError, match="X has 1000 samples and Y 50.*equal numbers"):
        c2st(torch.randn(1000, 2, generator=g), torch.randn(50, 2, generator=g))
    with pytest.raises(ValueError, match="at least num_folds=5"):
        c2st(X[:2], Y[:2])
    # A column constant in X (and shifted in Y) still separates the samples.
    constant = torch.cat([X[:, :1], torch.zeros(200, 1)], -1)
    shifted = torch.cat([X[:, :1].flip(0), torch.ones(200, 1)], -1)
    assert c2st(constant, shifted).item() > 0.95
    # numpy input is converted.
    assert c2st(X.numpy(), Y.numpy()).item() > 0.9


def test_sbc_and_predictive_check_check_their_counts():
    problem = BetaBernoulliModel(2.0, 3.0, num_data=5)
    for kwargs, match in (
        ({"num_posterior_samples": 0}, "num_posterior_samples must be an integer >= 1"),
        ({"num_bins": 0}, "num_bins must be an integer >= 1"),
        ({"num_simulations": 1}, "num_simulations must be an integer >= 2"),
        ({"coverage_levels": (0.5, 1.5)}, r"coverage_levels must lie in \(0, 1\)"),
    ):
        with pytest.raises(ValueError, match=match):
            sbc(problem.model, problem.guide, problem.data, **kwargs)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        posterior_predictive_check(
            problem.model,
            problem.guide,
            problem.data,
            statistics={"mean": lambda v: v["x"].mean()},
            num_samples=0,
        )


def test_mean_field_elbo_takes_sites_masked_out_entirely():
    """A pair masked out entirely on both sides (``.mask(False)``): Pyro's kl_divergence is
    the number 0, which failed with "'float' object has no attribute 'shape'"; now the pair
    adds nothing, as if it were not there (same draws, same value)."""

    def model(x, extra=True):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if extra:
            pyro.sample("w", dist.Normal(0.0, 1.0).mask(False))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x, extra=True):
        pyro.sample("z", dist.Normal(0.5, 0.8))
        if extra:
            pyro.sample("w", dist.Normal(1.0, 0.5).mask(False))

    x = torch.tensor(0.3)
    values = []
    for extra in (True, False):
        pyro.set_rng_seed(0)
        values.append(JointContrastiveMeanFieldELBO().loss(model, guide, x, extra))
    assert values[0] == values[1]


def test_mean_field_elbo_keeps_the_guide_term_of_a_site_masked_in_the_model_only():
    """poutine.mask(mask=False) on the model's site only: the loss is Trace_ELBO's,
    KL[q(z)||p(z)] + E_q[-log p(x|z)] + E_q[log q(w)] (the model's log p(w) masked, the
    guide's log q(w) not), so the site falls back to Monte Carlo."""

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with poutine.mask(mask=False):
            pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.5, 0.8))
        pyro.sample("w", dist.Normal(1.0, 0.5))

    x = torch.tensor(0.3)
    kl_z = math.log(1 / 0.8) + (0.8**2 + 0.5**2) / 2 - 0.5
    likelihood = 0.5 * math.log(2 * math.pi) + 0.5 * ((0.3 - 0.5) ** 2 + 0.8**2)
    neg_entropy_w = -0.5 * math.log(2 * math.pi * math.e * 0.5**2)
    exact = kl_z + likelihood + neg_entropy_w
    elbo = JointContrastiveMeanFieldELBO(num_particles=40000, vectorize_particles=True)
    # Per-particle sd of the Monte-Carlo terms is below 1: 4 SE < 0.02.
    assert elbo.loss(model, guide, x) == pytest.approx(exact, abs=0.02)


def test_mean_field_elbo_warns_as_pyro_when_the_guide_reorders_its_sites():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a, 1.0))

    def guide():  # b first, then a depending on it: not mean field
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        pyro.sample("a", dist.Normal(b / 2, 0.5))

    for elbo in (JointContrastiveMeanFieldELBO(), TraceMeanField_ELBO()):
        with pytest.warns(UserWarning, match="Failed to verify mean field restriction"):
            elbo.loss(model, guide)


def _normal_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


@pytest.mark.parametrize("bad", [np.zeros(5), [0.0, 1.0]], ids=["numpy", "list"])
def test_observations_that_are_not_tensors_are_refused(bad):
    with pytest.raises(ObservationTypeError, match="'x'.*not a torch.Tensor.*torch.as_tensor"):
        ForwardKL().loss(_normal_model, AutoAmortizedNormal(_normal_model), bad)


def test_non_finite_observations_are_named_before_any_step():
    x = torch.tensor([0.0, 1.0, math.nan, 2.0, math.inf])
    guide = AutoAmortizedNormal(_normal_model)
    with pytest.raises(NonFiniteError, match=r"'x': 2 of its 5 .*index \(2,\).*obs_mask"):
        ForwardKL().loss(_normal_model, guide, x)
    with pytest.raises(NonFiniteError, match="'x'"):
        guide(x)  # the autoguide inspects the model the same way

    # Masked-out entries may hold anything.
    def masked(x, mask):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x, obs_mask=mask)

    mask = torch.isfinite(x)
    assert "x_observed" in ModelLayout(masked, (x, mask)).observed_sites


def test_integer_observations_train_an_autoguide():
    """Counts (torch.long) with the autoguides: they failed building the networks (Pyro's
    AutoNormal accepts them). The Gamma-Poisson posterior mean is (2 + sum x) / (1 + n)."""

    def model(x):
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Poisson(rate), obs=x)

    x = torch.tensor([3, 1, 4, 1, 5])
    guide = AutoAmortizedNormal(model)
    # 500 pairs a step and a decaying rate: seeds 0-9 read mean errors of sd 0.07 (largest
    # 0.14); with 100 pairs at a constant rate, sd 0.15 (largest 0.43) against the bound.
    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.995})
    svi = SVI(model, guide, optim, ForwardKL(num_particles=500))
    for _ in range(300):
        svi.step(x)
    mean = guide.sample_posterior(x, num_samples=4000)["rate"].mean().item()
    assert mean == pytest.approx(16 / 6, rel=0.1)  # posterior sd 0.67: 0.27 is 0.4 sd


def test_an_improper_prior_is_named_when_pairs_are_simulated():
    def improper(x):
        mu = pyro.sample("mu", dist.ImproperUniform(dist.constraints.real, (), ()))
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    with pytest.raises(UnsampleableSiteError, match="'mu' \\(ImproperUniform\\).*proper prior"):
        simulate(improper, torch.zeros(()), num_simulations=3)


def test_forward_kl_needs_a_latent_site():
    def observed_only(x):
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(ValueError, match="no latent site.*obs= off"):
        ForwardKL().loss(observed_only, lambda x: None, torch.zeros(()))


def test_information_terms_of_a_batch_of_one_are_nan_with_a_reason():
    problem = LinearGaussianModel(torch.tensor([[1.0], [0.5]]), torch.zeros(2), 0.5, 1)
    elbo = JointContrastiveELBO(estimate_information=True)
    with pytest.warns(UserWarning, match="need at least two.*NaN"):
        elbo.loss(problem.model, problem.guide, problem.data)
    assert math.isnan(elbo.diagnostics["mutual_information"])
    assert math.isnan(elbo.diagnostics["marginal_kl"])


def test_sbc_refuses_guide_draws_of_the_wrong_shape():
    problem = BetaBernoulliModel(2.0, 3.0, num_data=5)

    def two_dim_guide(x):  # the model's p is a scalar
        p = problem.posterior(x)["p"]
        a, b = (
            c.unsqueeze(-1).expand(c.shape + (2,)) for c in (p.concentration1, p.concentration0)
        )
        pyro.sample("p", dist.Beta(a, b).to_event(1))

    with pytest.raises(ValueError, match="draws of 'p' have shape .* wrong event shape"):
        sbc(problem.model, two_dim_guide, problem.data, num_simulations=20)


def test_autoguide_defaults_scale_with_the_latent_dimension():
    """100 latent dimensions with default arguments: the flow's conditioner (50 hidden
    units) was narrower than its input (Pyro refused it), and the normal guide's 64-wide
    context a bottleneck."""

    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(100), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    x = torch.zeros(100)
    flow = AutoAmortizedFlow(model, num_transforms=1)
    assert flow(x)["z"].shape == (100,) and flow.flow_hidden_dims == [200, 200]
    normal = AutoAmortizedNormal(model)
    normal(x)
    assert normal.context_dim == 200 and normal.hidden_dims == (200, 200)
    pyro.clear_param_store()  # another guide of the same name
    small = AutoAmortizedNormal(_normal_model)
    small(torch.zeros(3))
    assert small.context_dim == 64  # unchanged for few latents


def test_a_bank_must_match_the_model_and_the_data():
    """A bank of data sets of 10 points trained on 100 points fitted the posterior of 10
    (sd 0.306 against the exact 0.100); another model's bank failed with KeyError 'x'; a
    float64 bank with a dtype error; NaN in a bank deep in the guide."""
    ten, hundred = torch.zeros(10), torch.zeros(100)
    bank = simulate(_normal_model, ten, num_simulations=200)
    guide = AutoAmortizedNormal(_normal_model)
    with pytest.raises(ValueError, match=r"observations\['x'\] simulations have shape \(10,\)"):
        ForwardKL(simulations=bank).loss(_normal_model, guide, hundred)

    def other(x):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(theta, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"bank's latents are \['mu'\].*another model"):
        ForwardKL(simulations=bank).loss(other, AutoAmortizedNormal(other), ten)

    pyro.clear_param_store()
    as_double = {
        part: {k: v.double() for k, v in bank[part].items()}
        for part in bank
        if part != "num_invalid"
    }
    value = ForwardKL(num_particles=50, simulations=as_double).loss(
        _normal_model, AutoAmortizedNormal(_normal_model), ten
    )
    assert math.isfinite(value)  # converted to the model's float32

    broken = {part: dict(bank[part]) for part in ("latents", "observations")}
    broken["observations"]["x"] = bank["observations"]["x"].clone()
    broken["observations"]["x"][[3, 7], 2] = math.nan
    with pytest.raises(NonFiniteError, match=r"observations\['x'\].*2 of its 200"):
        ForwardKL(simulations=broken)


def test_standardization_is_relative_to_the_data_scale():
    """Data on a scale of 3e-7 were left unscaled by an absolute 1e-6 floor (posteriors off
    by orders of magnitude)."""
    from pyro_jc.nn import Standardize

    g = torch.Generator().manual_seed(0)
    x = 3e-7 * torch.randn(1000, 2, generator=g) + 1e-6
    s = Standardize(2)
    s.fit(x)
    y = s(x)
    assert torch.allclose(y.mean(0), torch.zeros(2), atol=1e-4)
    assert torch.allclose(y.std(0), torch.ones(2), atol=1e-4)
    constant = torch.cat([x[:, :1], torch.full((1000, 1), 5.0)], -1)
    with pytest.warns(UserWarning, match=r"1 of 2 features are constant .*feature 1\)"):
        s.fit(constant)
    assert s.std[1] == 1.0  # a constant column keeps unit scale


def test_a_guide_input_that_never_varies_is_named():
    """A constant column was divided by silently (c2st) or kept without a word."""

    def model(x, flag):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)
        pyro.sample("flag", dist.Delta(torch.ones(())), obs=flag)

    loss = ForwardKL(num_particles=32)
    svi = SVI(model, AutoAmortizedNormal(model), pyro.optim.Adam({"lr": 1e-2}), loss)
    with pytest.warns(UserWarning, match=r"observations of \['flag', 'x'\].*1 of 2 features"):
        with warnings.catch_warnings():
            # 'flag' depends on no latent, which the vectorization warning suspects too.
            warnings.simplefilter("ignore", VectorizationWarning)
            svi.step(torch.tensor(0.0), torch.tensor(1.0))


def _positive_latent_guide(guide_class):
    def model(x):
        z = pyro.sample("z", dist.LogNormal(0.0, 0.5))
        pyro.sample("x", dist.Normal(z, 0.1), obs=x)

    pyro.set_rng_seed(0)
    guide = guide_class(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), ForwardKL(num_particles=64))
    for _ in range(20):
        svi.step(torch.tensor(1.0))
    return guide


@pytest.mark.parametrize("guide_class", [AutoAmortizedNormal, AutoAmortizedFlow])
def test_observations_far_outside_the_training_range_are_reported(guide_class):
    """At x = -20 a LogNormal latent came back as exactly 0.0 or inf without a warning."""
    guide = _positive_latent_guide(guide_class)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to report inside the training range
        guide.sample_posterior(torch.tensor(1.2), num_samples=100)
    with pytest.warns(UserWarning, match=r"reach [\d.]+ standard deviations .* extrapolating"):
        guide.sample_posterior(torch.tensor(-20.0), num_samples=100)


def test_draws_that_overflow_the_support_are_reported():
    guide = _positive_latent_guide(AutoAmortizedNormal)
    guide._extrapolated = True  # the extrapolation warning was given already
    with pytest.warns(UserWarning, match=r"of the draws of site 'z' overflowed its support"):
        z = guide.sample_posterior(torch.tensor(-1e6), num_samples=100)["z"]
    assert bool(((z == 0) | torch.isinf(z)).any())


def test_a_complex_simulator_is_refused():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        sim = Implicit(lambda z: torch.polar(torch.ones_like(z), z), z)
        pyro.sample("x", sim, obs=x)

    with pytest.raises(SimulatorError, match="complex values.*view_as_real"):
        simulate(model, torch.zeros(()), num_simulations=4)


def test_the_adversarial_loss_trains_around_a_guide_without_parameters():
    """It failed with torch's 'element 0 of tensors does not require grad'."""
    problem = LinearGaussianModel(torch.tensor([[1.0], [0.5]]), torch.zeros(2), 0.5, 64)
    loss = AdversarialELBO(warmup_steps=2, hidden_dims=(8,))
    value = loss.loss_and_grads(problem.model, problem.guide, problem.data)
    assert math.isfinite(value) and loss.num_guide_steps == 1


def test_a_budget_overrun_by_slow_steps_is_reported():
    """fit(seconds=0.5) with a slow simulator took 4.5 s without a word: the clock is read
    between steps. The overrun is now reported."""
    import time

    def slow(z):
        time.sleep(0.2)
        return z + torch.randn_like(z)

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", Implicit(slow, z), obs=x)

    loss = ForwardKL(num_particles=10)
    svi = SVI(model, AutoAmortizedNormal(model), pyro.optim.Adam({"lr": 1e-2}), loss)
    with pytest.warns(UserWarning, match=r"budget was 0.05 s but training took .*between steps"):
        history = loss.fit(svi, torch.zeros(()), seconds=0.05)
    assert history["steps"] >= 1 and history["seconds"] > 0.1


def _failing_simulator_model(on_invalid, vectorized, threshold=1.5, interrupt_at=None):
    """z ~ N(0, 1); a numpy simulator that raises for z > threshold (or, at call number
    ``interrupt_at``, raises KeyboardInterrupt as Ctrl-C would)."""
    calls = [0]

    def simulator(z):
        calls[0] += 1
        if interrupt_at is not None and calls[0] == interrupt_at:
            raise KeyboardInterrupt
        if (np.asarray(z) > threshold).any():
            raise ValueError(f"no solution for z = {z}")
        return z + 0.1 * np.random.randn(*np.shape(z))

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        sim = Implicit(simulator, z, numpy=True, vectorized=vectorized, on_invalid=on_invalid)
        pyro.sample("x", sim, obs=x)

    return model


def test_simulate_keeps_the_finished_chunks_when_a_simulator_raises():
    """The exception escaped simulate() and every draw already made was lost."""
    pyro.set_rng_seed(0)
    model = _failing_simulator_model("raise", vectorized=False, threshold=2.5)
    with pytest.raises(SimulatorError, match=r"draw \d+ of 10 with parameters") as info:
        simulate(model, torch.zeros(()), num_simulations=2000, batch_size=10)
    message = str(info.value)
    assert "simulate stopped in chunk" in message and "ValueError: no solution" in message
    kept = info.value.simulations
    num_kept = int(message.split("after ")[1].split(" of")[0])
    assert num_kept > 0 and num_kept % 10 == 0
    assert kept["latents"]["z"].shape == (num_kept,)
    assert bool((kept["latents"]["z"] <= 2.5).all())
    assert torch.allclose(kept["observations"]["x"], kept["latents"]["z"], atol=0.6)


@pytest.mark.parametrize("vectorized", [False, True], ids=["one_by_one", "vectorized"])
def test_drop_covers_draws_that_raise(vectorized):
    """on_invalid='drop' dropped non-finite draws only; an exception escaped."""
    pyro.set_rng_seed(0)
    model = _failing_simulator_model("drop", vectorized=vectorized)
    with pytest.warns(UserWarning) as record:
        bank = simulate(model, torch.zeros(()), num_simulations=1000)
    z = bank["latents"]["z"]
    assert z.shape == (1000,) and bool((z <= 1.5).all())
    # P(z > 1.5) = 0.0668: about 72 of the ~1072 draws raised, within Monte-Carlo error.
    expected = 1000 * 0.0668 / (1 - 0.0668)
    assert abs(bank["num_invalid"] - expected) < 5 * math.sqrt(expected)
    messages = [str(w.message) for w in record]
    first = [m for m in messages if "raised ValueError for some draws" in m]
    assert len(first) == 1 and "Traceback" in first[0] and "no solution" in first[0]
    assert any(f"dropped {bank['num_invalid']} invalid" in m for m in messages)


def test_a_simulator_that_raises_for_every_draw_is_an_error_even_with_drop():
    model = _failing_simulator_model("drop", vectorized=False, threshold=-math.inf)
    with pytest.raises(SimulatorError, match="every one of the 100 draws"):
        simulate(model, torch.zeros(()), num_simulations=100)


def test_ctrl_c_in_simulate_returns_the_finished_chunks():
    """Ctrl-C left nothing: one batch of everything, and the exception escaped."""
    pyro.set_rng_seed(0)
    model = _failing_simulator_model("raise", vectorized=True, threshold=math.inf, interrupt_at=4)
    with pytest.warns(UserWarning, match="interrupted: returning the 30 of 1000"):
        bank = simulate(model, torch.zeros(()), num_simulations=1000, batch_size=10)
    assert bank["latents"]["z"].shape == (30,) and bank["observations"]["x"].shape == (30,)
    model = _failing_simulator_model("raise", vectorized=True, threshold=math.inf, interrupt_at=1)
    with pytest.raises(KeyboardInterrupt):  # nothing finished: nothing to return
        simulate(model, torch.zeros(()), num_simulations=1000, batch_size=10)


def test_simulate_progress_moves_per_chunk(monkeypatch):
    """The bar stayed at 0/200 until everything was simulated."""
    import tqdm.auto

    updates = []

    class Bar:
        def __init__(self, total, desc, initial=0):
            self.total, self.n = total, initial

        def update(self, k):
            self.n += k
            updates.append(self.n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    model = _failing_simulator_model("raise", vectorized=True, threshold=math.inf)
    simulate(model, torch.zeros(()), num_simulations=20000, progress=True)
    assert updates == list(range(200, 20001, 200))  # a hundredth of the work per chunk


def test_simulate_is_reproducible_per_chunk_size_and_moves_the_global_state():
    model = _failing_simulator_model("raise", vectorized=True, threshold=math.inf)
    banks = []
    for _ in range(2):
        pyro.set_rng_seed(3)
        banks.append(simulate(model, torch.zeros(()), num_simulations=300, batch_size=50))
    banks.append(simulate(model, torch.zeros(()), num_simulations=300, batch_size=50))
    x = [b["observations"]["x"] for b in banks]
    assert torch.equal(x[0], x[1]) and not torch.equal(x[1], x[2])


def _sums_everything(x):
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z.sum(), 1.0), obs=x)  # sums over the simulations too


def _indexes_from_the_left(x):
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z[0] + z[1], 1.0), obs=x)


@pytest.mark.parametrize("guide_class", [AutoAmortizedNormal, AutoAmortizedFlow])
def test_a_model_that_pools_the_simulations_is_reported(guide_class):
    """``z.sum()`` (over the simulations too) trained silently on pooled simulations."""
    data = torch.tensor(0.5)
    loss = ForwardKL(8)
    svi = SVI(_sums_everything, guide_class(_sums_everything), pyro.optim.Adam({"lr": 1e-2}), loss)
    with pytest.warns(VectorizationWarning, match=r"'x'.*vectorization-safe.*z.sum\(-1\)"):
        svi.step(data)
    with pytest.warns(VectorizationWarning, match="model is the place to fix"):
        simulate(_sums_everything, data, num_simulations=8)
    # One simulation per model run is the documented way out for such a model.
    loss = ForwardKL(4, vectorize_particles=False)
    svi = SVI(_sums_everything, guide_class(_sums_everything), pyro.optim.Adam({"lr": 1e-2}), loss)
    assert math.isfinite(svi.step(data))


@pytest.mark.parametrize("guide_class", [AutoAmortizedNormal, AutoAmortizedFlow])
def test_a_model_that_indexes_the_simulations_is_named_as_the_cause(guide_class):
    """``z[0]`` raised a PlateShapeError telling the user to fix the guide (the autoguide)."""
    model = _indexes_from_the_left
    svi = SVI(model, guide_class(model), pyro.optim.Adam({"lr": 1e-2}), ForwardKL(8))
    with pytest.warns(VectorizationWarning):
        with pytest.raises(PlateShapeError, match=r"vectorization-safe.*z\[\.\.\., 0\]") as info:
            svi.step(torch.tensor(0.5))
    assert "the model is the place to fix" in str(info.value)
