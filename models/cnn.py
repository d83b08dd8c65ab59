from __future__ import annotations

from torch import nn

from models.mlp import ACTIVATIONS

MIN_SIDE = 4  # two 2x2 poolings halve each side twice: below 4 a side would pool away to nothing


class CNN(nn.Module):
    """Two blocks of 3x3 conv (padding 1) -> [BatchNorm2d] -> activation -> 2x2 max pool, then a linear head.

    Takes the MLP's keywords, with `input_shape` (channels, height, width) for `in_dim` and `hidden` the two
    blocks' channel counts. BatchNorm and Dropout (before the head) are optional and off by default, as in
    the MLP: they are what make model.train() and model.eval() differ.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: tuple[int, ...] = (16, 32),
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"CNN needs inputs of shape (channels, height, width), got {tuple(input_shape)}")
        channels, height, width = input_shape
        if height < MIN_SIDE or width < MIN_SIDE:
            raise ValueError(f"CNN needs height and width of at least {MIN_SIDE} (two 2x2 poolings), "
                             f"got {height}x{width}")
        if len(hidden) != 2 or min(hidden) < 1:
            raise ValueError(f"CNN needs exactly two positive channel counts in hidden (one per conv block), "
                             f"got {tuple(hidden)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r} (choose from {', '.join(ACTIVATIONS)})")
        layers: list[nn.Module] = []
        for out_channels in hidden:
            # BatchNorm's shift makes a conv bias redundant.
            layers.append(nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(ACTIVATIONS[activation]())
            layers.append(nn.MaxPool2d(2))
            channels = out_channels
        layers.append(nn.Flatten())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(channels * (height // 4) * (width // 4), num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
