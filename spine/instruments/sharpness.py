"""Sharpness: the largest eigenvalue of the Hessian of the mean training loss.

Gradient descent on a quadratic diverges once lr * lambda_max > 2 (Cohen et al. 2021, "edge of
stability"), so lambda_max against 2/lr says how close a run is to that edge. It is found by power
iteration on Hessian-vector products, each one a double backward:

    Hv = d/dw ( dL/dw . v )

The caller's side:

- Call it on the *unwrapped* module (DDP does not support double backward); a DDP wrapper passed in
  is unwrapped here.
- Under DDP, every rank passes its own shard of the measurement samples and `all_reduce` (an
  in-place SUM over ranks, e.g. spine.distributed.all_reduce_sum); every rank must call it (it runs
  one all-reduce per iteration, the same number on every rank). At world 1, all_reduce=None.
- Off the hot path: it runs its own forwards and backwards (two per chunk per iteration) and
  reads one small tensor back per iteration.

What is measured: the model in eval mode (dropout off, BatchNorm on its running statistics), so
the measurement neither draws dropout masks nor couples the samples of a chunk through batch
statistics (which would make the answer depend on the chunk size). With BatchNorm this is the
curvature of the eval-mode function, not of the train-mode loss of a batch.

Left exactly as found: every module's training flag, every parameter's .grad (torch.autograd.grad
never writes .grad, unlike backward(create_graph=True), which also leaks the graph), and the
global RNG streams (CPU and any CUDA device of the parameters), so a run with the instrument on
trains bit-identically to one with it off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

AllReduce = Callable[[torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def top_hessian_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    iters: int = 100,
    tol: float = 1e-5,
    batch_size: int | None = None,
    all_reduce: AllReduce | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """The largest (most positive) eigenvalue of the Hessian of the mean of `loss_fn` over all samples.

    loss_fn(logits, y) must return the MEAN loss over its batch, like the loop's training loss
    (nn.CrossEntropyLoss()); it is weighted by the chunk's size here, so chunks of any size, and
    shards of different sizes on different ranks, give the Hessian of the mean over all samples.
    batch_size: samples per forward (micro-batching; None = all of x at once). The chunked HVPs are
    summed, then divided by the total count (summed over ranks with `all_reduce`).
    iters, tol: at most `iters` products per power iteration; it stops once the eigenvalue estimate
    changes by at most tol * |estimate| between two products.
    generator: draws the random start vector; default torch.Generator seeded with 0, the same on
    every rank (the ranks must start from the same vector). The global RNG is never consumed.

    Power iteration finds the eigenvalue of largest magnitude. If that one is negative, a second
    iteration on H - lambda_neg * I (all of whose eigenvalues are >= 0) finds the largest one.
    """
    module = model.module if isinstance(model, DistributedDataParallel) else model
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters that require grad")
    if generator is None:
        generator = torch.Generator(device=params[0].device).manual_seed(0)
    flags = [(m, m.training) for m in module.modules()]
    cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    hvp = _HessianVectorProduct(module, params, loss_fn, x, y, batch_size, all_reduce)
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.enable_grad():
            module.eval()
            dominant = _power_iteration(hvp, generator, iters, tol, shift=0.0)
            if dominant >= 0:
                return dominant
            # The dominant eigenvalue is negative: H - dominant*I has eigenvalues lambda_i - dominant >= 0,
            # the largest of which is lambda_max - dominant.
            return dominant + _power_iteration(hvp, generator, iters, tol, shift=dominant)
    finally:
        for m, was_training in flags:  # per module: a model may hold some modules in eval on purpose
            m.training = was_training


class _HessianVectorProduct:
    """Hv of the mean loss over all samples (all ranks), plus a piggy-backed vote in the same all-reduce."""

    def __init__(self, module: nn.Module, params: list[torch.Tensor], loss_fn: LossFn, x: torch.Tensor,
                 y: torch.Tensor, batch_size: int | None, all_reduce: AllReduce | None) -> None:
        self.module, self.params, self.loss_fn = module, params, loss_fn
        self.x, self.y = x, y
        self.batch_size = batch_size or max(len(x), 1)
        self.all_reduce = all_reduce
        self.sizes = [p.numel() for p in params]
        self.device = params[0].device

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.x), self.batch_size):
            yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]

    def __call__(self, v: torch.Tensor, vote: float) -> tuple[torch.Tensor, float, float]:
        """(H v, votes, ranks): votes = how many ranks sent vote 1, ranks = how many ranks took part."""
        pieces = [u.view_as(p).to(p.dtype) for u, p in zip(v.split(self.sizes), self.params, strict=True)]
        local = torch.zeros(self.dim + 3, dtype=torch.float64, device=self.device)
        for xc, yc in self._chunks():
            # The loss_fn gives the chunk's mean; times its size, chunks (and ranks) add up to the total sum.
            loss = self.loss_fn(self.module(xc), yc) * len(xc)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            terms = [(g * u).sum() for g, u in zip(grads, pieces, strict=True) if g is not None and g.requires_grad]
            if not terms:  # the loss is linear in every parameter: H = 0 for this chunk
                continue
            hv = torch.autograd.grad(torch.stack(terms).sum(), self.params, allow_unused=True)
            local[:self.dim] += torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1).double()
                                           for h, p in zip(hv, self.params, strict=True)])
        local[self.dim:] = torch.tensor([float(len(self.x)), vote, 1.0], dtype=torch.float64)
        total = self.all_reduce(local) if self.all_reduce is not None else local
        count, votes, ranks = total[self.dim:].tolist()
        if count == 0:
            raise ValueError("no samples to measure the sharpness on (x is empty on every rank)")
        return total[:self.dim] / count, votes, ranks


def _power_iteration(hvp: _HessianVectorProduct, generator: torch.Generator, iters: int, tol: float,
                     shift: float) -> float:
    """Dominant eigenvalue of H - shift*I.

    Every rank must stop after the same product, or one waits forever in the next all-reduce. So the
    decision is taken from numbers every rank holds identically: each rank's "converged" vote rides in
    the next product's all-reduce, and the iteration stops when every rank voted yes. That costs one
    extra product and no extra collective.
    """
    v = torch.randn(hvp.dim, generator=generator, dtype=torch.float64, device=generator.device)
    v = (v / v.norm()).to(hvp.device)
    estimate, previous, vote = 0.0, None, 0.0
    for _ in range(iters):
        hv, votes, ranks = hvp(v, vote)
        hv = hv - shift * v
        estimate, norm = torch.stack([torch.dot(v, hv), hv.norm()]).tolist()  # Rayleigh quotient, |v| = 1
        if votes == ranks or norm == 0.0:  # all ranks converged, or H v = 0 (then the estimate is exactly 0)
            break
        vote = float(previous is not None and abs(estimate - previous) <= tol * abs(estimate))
        previous = estimate
        v = hv / norm
    return estimate
