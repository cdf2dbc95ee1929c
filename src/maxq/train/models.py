"""Models for ``maxq train``: any torchvision classifier by name, CIFAR-style ResNets, and a small CNN.

Models are built from stock ``torch.nn`` modules; ``maxq.sparsify_`` needs nothing special from them. A
torchvision model is adapted to the dataset by its constructor (``num_classes``) and, when the dataset is not
RGB, by replacing its first convolution with one of the right input width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "model_names"]


# -- CIFAR-style ResNets (He et al. 2016 for resnet20/32/44/56; a 3x3-stem ResNet-18 for small images) --------


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # projection shortcut (option B)
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, no max-pool, ``len(widths)`` stages of ``depth`` basic blocks."""

    def __init__(self, depth: int, widths: tuple[int, ...], in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(depth):
                blocks.append(_Basic(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(self.layers(x)), 1))


def _cifar_resnet(depth: int, widths: tuple[int, ...]) -> Callable[[int, int, int], nn.Module]:
    return lambda channels, classes, size: CifarResNet(depth, widths, channels, classes)


def cnn(in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128)) -> nn.Module:
    """Small CNN for 28x28 inputs (the Fashion-MNIST default): a conv stem, then per stage two 3x3 convs and a
    2x2 max-pool, global average pooling and a linear classifier. Every conv after the stem has a channel count
    divisible by 16, so every N:M pattern up to 1:16 applies."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    cin = widths[0]
    for i, width in enumerate(widths):
        for _ in range(2):
            layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            cin = width
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def mlp(in_features: int, num_classes: int, widths: tuple[int, ...] = (512, 512, 256)) -> nn.Module:
    """Linear-heavy baseline: flatten, then Linear-BN-ReLU blocks (widths divisible by 16) and a classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    cin = in_features
    for width in widths:
        layers += [nn.Linear(cin, width), nn.BatchNorm1d(width), nn.ReLU()]
        cin = width
    layers.append(nn.Linear(cin, num_classes))
    return nn.Sequential(*layers)


#: name -> ``(in_channels, num_classes, image_size) -> model`` for the models defined here.
MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "cnn": lambda c, k, s: cnn(c, k),
    "cnn_small": lambda c, k, s: cnn(c, k, (16, 32, 64)),
    "mlp": lambda c, k, s: mlp(c * s * s, k),
    "resnet20": _cifar_resnet(3, (16, 32, 64)),
    "resnet32": _cifar_resnet(5, (16, 32, 64)),
    "resnet44": _cifar_resnet(7, (16, 32, 64)),
    "resnet56": _cifar_resnet(9, (16, 32, 64)),
    "resnet18_cifar": _cifar_resnet(2, (64, 128, 256, 512)),
}


def model_names() -> list[str]:
    """Every name `build_model` accepts: ours, then torchvision's classification models."""
    from torchvision import models as tvm

    return sorted(MODELS) + sorted(tvm.list_models(module=tvm))


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    1,
                    child.bias is not None,
                    child.padding_mode,
                )
                setattr(parent, child_name, new)
                return
    raise ValueError("model has no Conv2d to adapt to the input channels")


def build_model(name: str, in_channels: int, num_classes: int, image_size: int | None = None) -> nn.Module:
    """Build ``name`` for ``in_channels``-channel inputs and ``num_classes`` classes.

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    if name in MODELS:
        if image_size is None and name == "mlp":
            raise ValueError("the mlp model needs the input image size")
        return MODELS[name](in_channels, num_classes, image_size or 0)
    from torchvision import models as tvm

    available = tvm.list_models(module=tvm)
    if name not in available:
        raise ValueError(
            f"unknown model {name!r}; choose one of {sorted(MODELS)} or a torchvision classifier "
            f"({', '.join(available[:6])}, ...)"
        )
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name.startswith(("vit_", "swin_")) and image_size is not None:
        kwargs["image_size"] = image_size
    model = tvm.get_model(name, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model
