"""Opt-in instruments for the loop (the guards excepted, which are near-free and always on).

Each module has one small interface and no import of train.py; the loop calls
them at its own cadence:

- sharpness:   top Hessian eigenvalue of the training loss (power iteration on Hessian-vector products)
- noise_scale: gradient noise scale B_simple (McCandlish et al. 2018) from two batch sizes
- layer_stats: per-layer gradient/weight norms, update ratios and activation health on a logged step
- lr_find:     the LR range test (Smith 2017) as a state machine the loop feeds
- guards:      live checks on the loop's state (train/eval mode, zero_grad, set_epoch)
"""
