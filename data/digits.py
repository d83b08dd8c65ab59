"""scikit-learn's bundled 8x8 handwritten digits: 1,797 images, 10 classes, no download.

The images ship inside the scikit-learn wheel, so every rank reads the same
bytes without network access; the split is seeded and stratified, so every
rank also holds the same train and validation sets.
"""

from __future__ import annotations

import torch

from data.split import stratified_split

DIGITS_SHAPE = (1, 8, 8)  # channels, height, width
DIGITS_CLASSES = 10
DIGITS_SAMPLES = 1797
_MAX_PIXEL = 16.0  # the images are 8x8 counts of 4x4 blocks of a 32x32 bitmap: values 0..16


def load_digits_split(val_fraction: float, seed: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, val_x, val_y): x float32 (N, 1, 8, 8) in [0, 1], y int64 in 0..9.

    The validation split is stratified (every digit held out in the same
    proportion, within one image) and depends on `seed` alone: the same seed
    gives bit-identical tensors. With val_fraction 0.2: 1,438 train / 359 val
    (round(1797 * 0.2) = 359, the rule the synthetic sets use).
    """
    # Imported here: scikit-learn costs about 1.8 s to import, which runs that do not use digits should not pay.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).to(torch.float32).div_(_MAX_PIXEL).unsqueeze(1).contiguous()
    y = torch.from_numpy(bunch.target).to(torch.int64)
    train_idx, val_idx = stratified_split(y, val_fraction, torch.Generator().manual_seed(seed))
    return x[train_idx].contiguous(), y[train_idx].contiguous(), x[val_idx].contiguous(), y[val_idx].contiguous()
