"""Small helpers shared by the tests (models with exact answers live in pyro_jc.testing)."""

import math

import torch


def mean_and_se(samples):
    """Mean and Monte-Carlo standard error of a list of equally shaped tensors or numbers."""
    samples = torch.stack([torch.as_tensor(s) for s in samples]).double()
    return samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
