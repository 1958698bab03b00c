"""Small networks shared by the guides: MLPs, a permutation-invariant set embedding and
feature standardization."""

from __future__ import annotations

import warnings

import torch
from torch import nn


class MLP(nn.Sequential):
    """Fully connected network ``in_dim -> hidden_dims -> out_dim`` acting on the last dim.

    :param int in_dim: input features.
    :param hidden_dims: widths of the hidden layers.
    :param int out_dim: output features.
    :param activation: activation module class between layers.
    """

    def __init__(self, in_dim, hidden_dims, out_dim, activation=nn.ReLU):
        layers = []
        for width in hidden_dims:
            layers += [nn.Linear(in_dim, width), activation()]
            in_dim = width
        layers.append(nn.Linear(in_dim, out_dim))
        super().__init__(*layers)
        self.out_dim = out_dim


class DeepSet(nn.Module):
    """Permutation-invariant embedding of a set of ``n`` feature vectors:
    ``rho(mean_i phi(x_i))`` over dim ``-2`` (Zaheer et al., 2017). Input ``(..., n, in_dim)``,
    output ``(..., out_dim)``.
    """

    def __init__(self, in_dim, hidden_dims, out_dim, activation=nn.ReLU):
        super().__init__()
        width = hidden_dims[-1] if hidden_dims else out_dim
        self.phi = MLP(in_dim, hidden_dims[:-1], width, activation)
        self.rho = MLP(width, hidden_dims[-1:], out_dim, activation)
        self.out_dim = out_dim

    def forward(self, x):
        return self.rho(torch.relu(self.phi(x)).mean(-2))


class Standardize(nn.Module):
    """``(x - mean) / std`` per feature (last dim), with statistics held in buffers so they
    follow the module's device and are saved with its state (and, in the amortized
    autoguides, with Pyro's param store). Identity until :meth:`fit`.

    :param int dim: number of features.
    :param float min_std: features whose standard deviation is at most ``min_std`` times
        their own largest magnitude are treated as constant and keep unit scale (relative,
        so that data on a scale of 1e-7 are standardized as data on a scale of 1); a
        warning names them.
    :param str what: what the features are, for that warning.
    """

    def __init__(self, dim, min_std=1e-6, what="features"):
        super().__init__()
        self.what = what
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        # A floating-point flag (1 once fitted), so it can live in Pyro's param store.
        self.register_buffer("fitted", torch.zeros(()))
        self.min_std = min_std
        self._known_fitted = False  # Python mirror of `fitted` once True: no device sync

    @property
    def is_fitted(self):
        """Whether :meth:`fit` has set the statistics (read from the device once)."""
        if not self._known_fitted:
            self._known_fitted = bool(self.fitted > 0)
        return self._known_fitted

    def _state_changed(self):
        """The buffers were replaced (loaded): read the flag again."""
        self._known_fitted = False

    def _load_from_state_dict(self, *args, **kwargs):
        self._state_changed()
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def fit(self, x, warn_constant=True):
        """Set the statistics from samples ``x`` of shape ``(..., dim)`` (all leading dims are
        samples). Constant features keep unit scale.

        :param bool warn_constant: warn about constant features (they are expected in a
            small batch of real data, not in simulations).
        """
        x = x.reshape(-1, x.shape[-1]).to(self.mean)
        finite = torch.isfinite(x).all(-1)
        x = x[finite]
        if x.shape[0] < 2:
            return
        std = x.std(0)
        # Per feature: a feature on a scale of 1e-7 beside one on a scale of 1 still varies.
        threshold = self.min_std * x.abs().amax(0)
        varies = std > threshold
        if warn_constant and not bool(varies.all()):
            constant = (~varies).nonzero().flatten().tolist()
            shown = ", ".join(map(str, constant[:10])) + (", ..." if len(constant) > 10 else "")
            warnings.warn(
                f"Standardizing {self.what}: {len(constant)} of {x.shape[-1]} features are "
                f"constant across the {x.shape[0]} samples (feature {shown}); they keep unit "
                "scale and carry no information to learn from. If they should vary, check the "
                "model or simulator that produces them (or their scale).",
                UserWarning,
                stacklevel=2,
            )
        self.mean.copy_(x.mean(0))
        self.std.copy_(torch.where(varies, std, torch.ones_like(std)))
        self.fitted.fill_(1.0)
        self._known_fitted = True

    def forward(self, x):
        return (x - self.mean) / self.std
