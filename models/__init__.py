"""Model registry. Adding a model is one small file and one line in `MODELS`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models.linear import LinearClassifier
from models.mlp import MLP

# Every builder takes the same keyword arguments; a model ignores those it has no use for.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "linear": LinearClassifier,
}


def build_model(
    name: str,
    in_dim: int,
    num_classes: int,
    hidden: tuple[int, ...] = (64, 64),
    activation: str = "relu",
    dropout: float = 0.0,
    batchnorm: bool = False,
) -> nn.Module:
    return MODELS[name](
        in_dim=in_dim,
        num_classes=num_classes,
        hidden=hidden,
        activation=activation,
        dropout=dropout,
        batchnorm=batchnorm,
    )
