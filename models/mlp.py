from __future__ import annotations

import math

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> activation -> [Dropout], per hidden layer, then a linear head.

    BatchNorm and Dropout are optional and off by default; they are what make
    model.train() and model.eval() matter, which is why they exist here.
    `input_shape` is one sample's shape: an image (C, H, W) is flattened in
    forward, which adds no module, so the state_dict keys stay those of a flat
    input.
    """

    def __init__(
        self,
        input_shape: int | tuple[int, ...],
        num_classes: int,
        hidden: tuple[int, ...] = (64, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_shape if isinstance(input_shape, int) else math.prod(input_shape)
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1) if x.dim() > 2 else x)  # (N, C, H, W) -> (N, C*H*W); flat input untouched
