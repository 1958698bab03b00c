"""pyro_jc.training: the loop for any SVI loss, interruption, and checkpoints that continue
training identically."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_jc import AdversarialELBO, AutoAmortizedFlow, ForwardKL, JointContrastiveELBO, optim
from pyro_jc.testing import BetaBernoulliModel, LinearGaussianModel
from pyro_jc.training import fit, load_checkpoint, save_checkpoint

PROBLEM = BetaBernoulliModel(2.0, 3.0, num_data=20, seed=0)


def beta_guide(x):
    a = pyro.param("a", torch.tensor(1.0), constraint=dist.constraints.positive)
    b = pyro.param("b", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("p", dist.Beta(a, b))


@pytest.mark.parametrize("improving", [True, False])
def test_fit_validates_and_keeps_the_moving_average(improving):
    """With average=d, validation sees, and training leaves behind, the exponential moving
    average of the parameters after each step (first value: the first step's)."""
    svi = SVI(PROBLEM.model, beta_guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    store = pyro.get_param_store()
    stepped, seen = [], []
    step = svi.step

    def recorded_step(*args):
        loss = step(*args)
        stepped.append(dict(store.named_parameters())["a"].detach().clone())
        return loss

    def validation():
        seen.append(dict(store.named_parameters())["a"].detach().clone())
        return -len(seen) if improving else len(seen)  # best: the last epoch, or the first

    svi.step = recorded_step
    decay = 0.9
    fit(svi, PROBLEM.data, steps_per_epoch=3, validation=validation, max_epochs=4,
        patience=2, lr_decays=0, average=decay)  # fmt: skip
    averages, average = [], None
    for value in stepped:
        average = value if average is None else decay * average + (1 - decay) * value
        averages.append(average)
    expected = averages[2::3]  # at the end of each epoch
    assert len(seen) == (4 if improving else 3)
    for got, want in zip(seen, expected, strict=False):
        assert torch.allclose(got, want, rtol=1e-6)
    assert not torch.allclose(expected[-1], stepped[len(seen) * 3 - 1])  # not the last step
    kept = dict(store.named_parameters())["a"]
    assert torch.allclose(kept, expected[len(seen) - 1] if improving else expected[0], rtol=1e-6)
    for bad in (1.0, 0, -0.5, "0.9"):
        with pytest.raises(ValueError, match="average must lie in"):
            fit(svi, PROBLEM.data, steps_per_epoch=1, validation=validation, average=bad)
    with pytest.raises(ValueError, match="average is validated and kept per epoch"):
        fit(svi, PROBLEM.data, num_steps=3, average=0.9)


@pytest.mark.slow
def test_fit_trains_any_svi_loss_with_a_budget_and_with_epochs():
    exact = PROBLEM.posterior(PROBLEM.data)["p"]
    svi = SVI(PROBLEM.model, beta_guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    history = fit(svi, PROBLEM.data, num_steps=600)
    assert history["steps"] == 600 and not history["interrupted"]
    a, b = pyro.param("a").item(), pyro.param("b").item()
    # Beta(22, 5) exactly: within the noise of a last iterate (1.6% of the mean's sd 0.08).
    assert a / (a + b) == pytest.approx(exact.mean.item(), abs=0.03)

    # Epochs with a validation callable: early stopping keeps the best parameters.
    pyro.clear_param_store()
    svi = SVI(PROBLEM.model, beta_guide, pyro.optim.Adam({"lr": 0.05}), JointContrastiveELBO())
    held_out = JointContrastiveELBO(num_particles=64, vectorize_particles=True)

    def validation():
        return held_out.loss(PROBLEM.model, beta_guide, PROBLEM.data)

    history = fit(
        svi, PROBLEM.data, steps_per_epoch=20, validation=validation, max_epochs=60, patience=3
    )
    assert 0 < history["epochs"] <= 60
    assert history["best_epoch"] == min(
        range(history["epochs"]), key=history["validation_loss"].__getitem__
    )
    with pytest.raises(ValueError, match="need epochs"):
        fit(svi, PROBLEM.data, max_epochs=3)
    with pytest.raises(ValueError, match="give a budget"):
        fit(svi, PROBLEM.data)


def test_ctrl_c_returns_the_history_and_keeps_the_best_guide():
    bank = pyro_jc_simulate(2000)
    guide = AutoAmortizedFlow(PROBLEM.model, num_transforms=1)
    loss = ForwardKL(num_particles=100, simulations=bank)
    svi = SVI(PROBLEM.model, guide, optim.Adam({"lr": 5e-3}), loss)
    step, count = svi.step, [0]

    def interrupted_step(*args):
        count[0] += 1
        if count[0] == 18 * 12 + 5:  # in the middle of epoch 13
            raise KeyboardInterrupt
        return step(*args)

    svi.step = interrupted_step
    history = loss.fit(svi, PROBLEM.data, patience=100)
    assert history["interrupted"] and history["epochs"] == 12
    best = min(history["validation_loss"])
    assert loss.validation_loss(PROBLEM.model, guide, PROBLEM.data) == pytest.approx(best)
    # A budget fit too.
    fresh = ForwardKL(num_particles=100)
    svi = SVI(PROBLEM.model, guide, optim.Adam({"lr": 5e-3}), fresh)
    svi.step = interrupted_step
    count[0] = 18 * 12
    history = fresh.fit(svi, PROBLEM.data, num_steps=100)
    assert history["interrupted"] and history["steps"] == 4


def pyro_jc_simulate(n):
    from pyro_jc import simulate

    return simulate(PROBLEM.model, PROBLEM.data, num_simulations=n)


def _run(make, steps_before, steps_after, path, resume):
    """Train ``steps_before`` steps and checkpoint, or (``resume``) load the checkpoint into
    fresh objects; then ``steps_after`` more steps. Returns the final parameters."""
    pyro.clear_param_store()
    model, guide, svi, args = make()
    if resume:
        svi.evaluate_loss(*args)  # set up: every parameter declared
        load_checkpoint(path, svi)
    else:
        pyro.set_rng_seed(0)
        for _ in range(steps_before):
            svi.step(*args)
        save_checkpoint(path, svi)
    for _ in range(steps_after):
        svi.step(*args)
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def _flow_forward_kl(optimizer):
    def make():
        guide = AutoAmortizedFlow(PROBLEM.model, num_transforms=2)
        svi = SVI(PROBLEM.model, guide, optimizer({"lr": 1e-2}), ForwardKL(num_particles=50))
        return PROBLEM.model, guide, svi, (PROBLEM.data,)

    return make


def _adversarial():
    problem = LinearGaussianModel(torch.tensor([[1.0], [0.5]]), torch.zeros(2), 0.5, 64)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 1)

        def forward(self, x):
            pyro.module("encoder", self)
            with pyro.plate("data", x.shape[-2]):
                pyro.sample("z", dist.Normal(self.linear(x), 0.5).to_event(1))

    guide = Encoder()
    loss = AdversarialELBO(warmup_steps=3, hidden_dims=(16,))
    svi = SVI(problem.model, guide, pyro.optim.Adam({"lr": 1e-2}), loss)
    return problem.model, guide, svi, (problem.data,)


@pytest.mark.parametrize(
    "make",
    [
        _flow_forward_kl(pyro.optim.Adam),
        _flow_forward_kl(optim.Adam),
        _adversarial,
    ],
    ids=["forward_kl-pyro_adam", "forward_kl-pyro_jc_adam", "adversarial"],
)
def test_a_checkpoint_continues_training_identically(make, tmp_path):
    path = tmp_path / "checkpoint.pt"
    straight = _run(make, 5, 5, path, resume=False)  # 5 steps, checkpoint, 5 more
    resumed = _run(make, 5, 5, path, resume=True)  # fresh objects from the checkpoint
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


def test_load_checkpoint_needs_the_parameters_declared(tmp_path):
    make = _flow_forward_kl(pyro.optim.Adam)
    path = tmp_path / "checkpoint.pt"
    _run(make, 2, 0, path, resume=False)
    pyro.clear_param_store()
    _, _, svi, _ = make()
    with pytest.raises(ValueError, match="evaluate_loss"):
        load_checkpoint(path, svi)
