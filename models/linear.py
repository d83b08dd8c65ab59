from __future__ import annotations

import math

from torch import nn


class LinearClassifier(nn.Module):
    """Logistic regression: the baseline that cannot separate moons, circles or XOR. An image is flattened."""

    def __init__(self, input_shape: int | tuple[int, ...], num_classes: int, **_unused) -> None:
        super().__init__()
        in_dim = input_shape if isinstance(input_shape, int) else math.prod(input_shape)
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1) if x.dim() > 2 else x)
