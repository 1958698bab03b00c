"""Classifier two-sample test (C2ST) with sbibm's published protocol, in torch.

A classifier is trained to tell samples ``X`` from samples ``Y``; its held-out accuracy is 0.5
when the two distributions are equal and approaches 1 as they separate. sbibm's protocol
(Lueckmann et al., 2021): z-score both with ``X``'s mean and standard deviation, an MLP with
two hidden ReLU layers of width ``10 * dim`` trained by Adam (learning rate 1e-3, batches of
200, L2 penalty 1e-4, until the training loss stops improving by 1e-4 for 10 epochs; scikit-
learn's ``MLPClassifier`` defaults), and the mean accuracy of 5-fold cross-validation.

Here the five folds' classifiers train at once as one batched network, on the samples'
device, and no scikit-learn is needed.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def c2st(
    X: torch.Tensor,
    Y: torch.Tensor,
    *,
    num_folds: int = 5,
    seed: int = 1,
    z_score: bool = True,
    hidden_multiplier: int = 10,
    learning_rate: float = 1e-3,
    batch_size: int = 200,
    l2: float = 1e-4,
    tol: float = 1e-4,
    patience: int = 10,
    max_epochs: int = 10000,
) -> torch.Tensor:
    """Classifier two-sample test accuracy of samples ``X`` against samples ``Y``.

    :param torch.Tensor X: ``(n, dim)`` samples (e.g. the reference posterior); a numpy
        array is converted.
    :param torch.Tensor Y: ``(n, dim)`` samples (e.g. the guide's), as many as ``X``:
        unequal sizes are refused (with unequal classes the accuracy of equal distributions
        is not 0.5), as are non-finite values. A column that is constant in ``X`` keeps its
        scale in the z-score.
    :param int num_folds: cross-validation folds.
    :param int seed: seeds the folds, initialization and minibatches (the global RNG is
        left untouched).
    :param bool z_score: standardize both samples with ``X``'s statistics.
    :param int hidden_multiplier: hidden width per dimension.
    :returns: the mean held-out accuracy over folds, a 0-dim tensor on ``X``'s device.

    >>> import torch
    >>> from pyro_jc.diagnostics import c2st
    >>> g = torch.Generator().manual_seed(0)
    >>> X, Y = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g) + 3.0
    >>> c2st(X, Y).item() > 0.9    # well separated: near-perfect accuracy
    True

    **Reference:** Lopez-Paz and Oquab (2017), *Revisiting classifier two-sample tests*;
    Lueckmann et al. (2021), *Benchmarking simulation-based inference* (sbibm).
    """
    X, Y = torch.as_tensor(X), torch.as_tensor(Y)  # numpy arrays and lists too
    if X.dim() != 2 or Y.dim() != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(
            f"c2st takes two (num_samples, dim) tensors of the same dim; got shapes "
            f"{tuple(X.shape)} and {tuple(Y.shape)}."
        )
    if len(X) != len(Y):
        raise ValueError(
            f"c2st: X has {len(X)} samples and Y {len(Y)}. With unequal classes a classifier's "
            "accuracy is not 0.5 for equal distributions (it can always guess the larger "
            f"class); pass equal numbers, e.g. X[:{min(len(X), len(Y))}] and "
            f"Y[:{min(len(X), len(Y))}]."
        )
    if len(X) < num_folds:
        raise ValueError(
            f"c2st needs at least num_folds={num_folds} samples of each distribution for "
            f"{num_folds}-fold cross-validation; got {len(X)}."
        )
    for name, samples in (("X", X), ("Y", Y)):
        bad = ~torch.isfinite(samples).all(-1) if samples.is_floating_point() else None
        if bad is not None and bool(bad.any()):
            raise ValueError(
                f"c2st: {int(bad.sum())} of the {len(samples)} rows of {name} hold NaN or inf "
                f"(first: row {int(bad.nonzero()[0])}); a classifier cannot score them. Drop "
                "those rows (from both samples, to keep the sizes equal)."
            )
    device, dtype = X.device, X.dtype if X.is_floating_point() else torch.get_default_dtype()
    X, Y = X.to(dtype), Y.to(device=device, dtype=dtype)
    if z_score:
        mean, std = X.mean(0), X.std(0)
        # A column constant in X keeps its scale (dividing by 0 would erase it).
        std = torch.where(std > 0, std, torch.ones_like(std))
        X, Y = (X - mean) / std, (Y - mean) / std
    data = torch.cat([X, Y])
    labels = torch.cat([X.new_zeros(len(X)), Y.new_ones(len(Y))])
    generator = torch.Generator(device="cpu").manual_seed(seed)
    train_index, test_index = _folds(len(data), num_folds, generator)
    net = _BatchedMLP(num_folds, data.shape[1], hidden_multiplier * data.shape[1], generator)
    net = net.to(device=device, dtype=dtype)
    # Minibatch order comes from a generator on the data's device (no per-epoch copies).
    shuffles = torch.Generator(device=device).manual_seed(seed)
    _train(
        net,
        data,
        labels,
        train_index.to(device),
        shuffles,
        learning_rate,
        batch_size,
        l2,
        tol,
        patience,
        max_epochs,
    )
    with torch.no_grad():
        test_x = data[test_index.to(device)]  # (folds, n_test, dim)
        predicted = net(test_x) > 0
        accuracy = (predicted == labels[test_index.to(device)].bool()).to(dtype).mean(-1)
    return accuracy.mean()


def _folds(n, num_folds, generator):
    """Shuffled K-fold split; the training sets are trimmed to one common size (at most one
    sample less) so that the folds train as one batch."""
    order = torch.randperm(n, generator=generator)
    sizes = [n // num_folds + (1 if f < n % num_folds else 0) for f in range(num_folds)]
    tests, start = [], 0
    for size in sizes:
        tests.append(order[start : start + size])
        start += size
    n_test = min(sizes)
    trains, start = [], 0
    for size in sizes:
        trains.append(torch.cat([order[:start], order[start + size :]]))
        start += size
    n_train = min(len(t) for t in trains)
    return (
        torch.stack([t[:n_train] for t in trains]),
        torch.stack([t[:n_test] for t in tests]),
    )


class _BatchedMLP(torch.nn.Module):
    """``num_folds`` independent MLPs ``dim -> hidden -> hidden -> 1`` evaluated with batched
    matrix products; Glorot-uniform initialization as scikit-learn's."""

    def __init__(self, num_folds, dim, hidden, generator):
        super().__init__()
        widths = [dim, hidden, hidden, 1]
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            w = (torch.rand(num_folds, fan_in, fan_out, generator=generator) * 2 - 1) * bound
            b = (torch.rand(num_folds, 1, fan_out, generator=generator) * 2 - 1) * bound
            self.weights.append(torch.nn.Parameter(w))
            self.biases.append(torch.nn.Parameter(b))

    def forward(self, x):
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = torch.relu(x)
        return x.squeeze(-1)


def _train(
    net, data, labels, train_index, generator, lr, batch_size, l2, tol, patience, max_epochs
):
    """Minibatch Adam per fold (elementwise, so the folds stay independent); a fold stops
    when its epoch loss has not improved by ``tol`` for more than ``patience`` epochs."""
    params = list(net.parameters())
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    num_folds, n_train = train_index.shape
    batch_size = min(batch_size, n_train)
    active = torch.ones(num_folds, dtype=torch.bool, device=data.device)
    best = torch.full((num_folds,), math.inf, device=data.device, dtype=data.dtype)
    stale = torch.zeros(num_folds, dtype=torch.long, device=data.device)
    beta1, beta2, eps, step = 0.9, 0.999, 1e-8, 0
    for _ in range(max_epochs):
        keys = torch.rand(num_folds, n_train, generator=generator, device=data.device)
        order = train_index.gather(1, keys.argsort(1))
        epoch_loss = torch.zeros(num_folds, device=data.device, dtype=data.dtype)
        for start in range(0, n_train, batch_size):
            index = order[:, start : start + batch_size]
            x, y = data[index], labels[index]
            logits = net(x)
            penalty = sum(w.pow(2).sum((1, 2)) for w in net.weights)
            loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)
            loss = loss + 0.5 * l2 * penalty / index.shape[1]
            grads = torch.autograd.grad(loss.sum(), params)
            step += 1
            mask = active.to(data.dtype)
            with torch.no_grad():
                for p, g, (m, v) in zip(params, grads, state, strict=True):
                    keep = mask.view(-1, *([1] * (p.dim() - 1)))
                    m.mul_(1 - (1 - beta1) * keep).add_(keep * (1 - beta1) * g)
                    v.mul_(1 - (1 - beta2) * keep).add_(keep * (1 - beta2) * g * g)
                    m_hat = m / (1 - beta1**step)
                    v_hat = v / (1 - beta2**step)
                    p.sub_(keep * lr * m_hat / (v_hat.sqrt() + eps))
            epoch_loss += loss.detach() * index.shape[1]
        epoch_loss /= n_train
        improved = epoch_loss < best - tol
        stale = torch.where(improved, torch.zeros_like(stale), stale + 1)
        best = torch.minimum(best, epoch_loss)
        active &= stale <= patience
        if not bool(active.any()):
            break
