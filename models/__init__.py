"""Model registry. Adding a model is one small file and one line in `MODELS`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.cnn import CNN
from models.linear import LinearClassifier
from models.mlp import MLP
from spine.errors import UsageError

# Every builder takes the same keyword arguments, `input_shape` (one sample's shape) first; a model ignores those
# it has no use for. The MLP and the linear model flatten an image; the CNN needs (channels, height, width).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "linear": LinearClassifier,
    "cnn": CNN,
}


def build_model(
    name: str,
    input_shape: int | tuple[int, ...],
    num_classes: int,
    hidden: tuple[int, ...] = (64, 64),
    activation: str = "relu",
    dropout: float = 0.0,
    batchnorm: bool = False,
) -> nn.Module:
    """The model `name` for samples of `input_shape` (an int: that many features). A model that cannot take this
    input (a CNN on 2-d points) is a UsageError naming the flag, before anything is written."""
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    try:
        return MODELS[name](
            input_shape=shape,
            num_classes=num_classes,
            hidden=hidden,
            activation=activation,
            dropout=dropout,
            batchnorm=batchnorm,
        )
    except ValueError as e:
        raise UsageError(f"--model {name}: {e}") from None


@torch.no_grad()
def multiply_adds(model: nn.Module, sample: torch.Tensor) -> int:
    """Multiply-adds of one forward of `sample` (a batch of one) through the model's Linear and Conv layers: the
    size of a step that train.py's default thread count is chosen from. Eval mode, so nothing is drawn or updated."""
    total = 0

    def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            k_h, k_w = module.kernel_size
            total += output[0].numel() * (module.in_channels // module.groups) * k_h * k_w

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    was_training = model.training
    try:
        model.eval()(sample)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total
