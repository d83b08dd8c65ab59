from __future__ import annotations

from torch import nn


class LinearClassifier(nn.Module):
    """Logistic regression: the baseline that cannot separate moons, circles or XOR."""

    def __init__(self, in_dim: int, num_classes: int, **_unused) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x):
        return self.fc(x)
