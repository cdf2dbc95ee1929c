"""Small stock-module networks for the tests (plain nn.Sequential / nn.Module, nothing maxq-specific)."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def small_cnn(channels: int = 16, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.BatchNorm2d(2 * channels),
        nn.ReLU(),
        nn.Conv2d(2 * channels, 2 * channels, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * channels, 32),
        nn.ReLU(),
        nn.Linear(32, classes),
    )


def mlp(widths: tuple[int, ...] = (32, 64, 48, 10)) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def batch(model: nn.Module, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    x = torch.randn(size, 3, 8, 8) if isinstance(first, nn.Conv2d) else torch.randn(size, first.in_features)
    return x, torch.randint(0, 10, (size,))


def train_steps(model: nn.Module, sparsifier, steps: int = 3, lr: float = 0.1, data=None) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = data if data is not None else batch(model)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if sparsifier is not None:
            sparsifier.regularize_()
        opt.step()
        if sparsifier is not None:
            sparsifier.step()
    return opt
