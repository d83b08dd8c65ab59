"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training").

G is the full-batch gradient, Sigma the per-example gradient covariance. A batch of b samples gives
E|G_b|^2 = |G|^2 + tr(Sigma)/b, so squared gradient norms at two batch sizes b < B give unbiased estimates

    |G|^2     ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

One step's estimates are noisy (the |G|^2 one often negative), so NoiseScaleEstimator smooths numerator
and denominator separately and reports the ratio of the averages, never an average of ratios.

Two sources of the two batch sizes come for almost nothing in the loop:

- DDPGradNoise (world > 1): a DDP communication hook takes each rank's *local* gradient (small batch: the
  per-rank step batch, micro-batch x accumulation steps under no_sync) before the all-reduce; the
  all-reduced .grad is the big batch (per-rank step batch x world size).
- MicroBatchGradNoise (world 1, gradient accumulation with k >= 2): each micro-batch's own gradient is the
  small batch, the step's accumulated gradient the big one.

Both keep the squared norms summed on the device (one or two in-place adds per step, no host sync) and hand
the estimates over with `collect(all_reduce)`, one all-reduce of three numbers, at the loop's logging cadence,
between steps.

Squared norms are of the gradient as the loop computes it: before clipping, and (with AMP, which the loop
does not use) they would first need unscaling and skipping of overflow steps.

No `from __future__ import annotations` here: DDP checks the comm hook's annotations against the real
types, and postponed annotations are strings.
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.utils.hooks import RemovableHandle

AllReduce = Callable[[torch.Tensor], torch.Tensor]
Number = float | torch.Tensor


def two_batch_estimates(small_sq_norm: Number, b_small: int, big_sq_norm: Number, b_big: int
                        ) -> tuple[Number, Number]:
    """Unbiased (|G|^2, tr(Sigma)) from |G_b|^2 at b = b_small and |G_B|^2 at B = b_big; floats or tensors."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    g2 = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
    trace_sigma = (small_sq_norm - big_sq_norm) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace_sigma


class NoiseScaleEstimator:
    """Exponential moving averages of |G|^2 and tr(Sigma), with bias correction, and their ratio.

    ema: weight of the past per update. Each update from a source already averages every step since the
    previous collect, so with one update per logging interval the window is about log_every / (1 - ema) steps.
    """

    def __init__(self, ema: float = 0.95) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        self.ema = ema
        self._g2 = 0.0  # uncorrected averages: sum of (1 - ema) * ema^age * estimate
        self._trace = 0.0
        self._weight = 0.0  # 1 - ema^updates: dividing by it removes the bias of starting from 0
        self.updates = 0

    def update(self, small_sq_norm: Number, b_small: int, big_sq_norm: Number, b_big: int) -> None:
        """One pair of squared gradient norms. Tensors are read back here (a host sync): call at log cadence."""
        g2, trace_sigma = two_batch_estimates(float(small_sq_norm), b_small, float(big_sq_norm), b_big)
        self.update_estimates(g2, trace_sigma)

    def update_estimates(self, g2: float, trace_sigma: float) -> None:
        """Estimates already formed (and averaged) by a source's collect()."""
        self._g2 = self.ema * self._g2 + (1.0 - self.ema) * float(g2)
        self._trace = self.ema * self._trace + (1.0 - self.ema) * float(trace_sigma)
        self._weight = self.ema * self._weight + (1.0 - self.ema)
        self.updates += 1

    def result(self) -> dict[str, float | None]:
        """{"b_simple", "g2", "trace_sigma"}: None before the first update; b_simple also None while either
        smoothed estimate is not positive (a noise-dominated start: the ratio would mean nothing)."""
        if not self.updates:
            return {"b_simple": None, "g2": None, "trace_sigma": None}
        g2, trace_sigma = self._g2 / self._weight, self._trace / self._weight
        b_simple = trace_sigma / g2 if g2 > 0 and trace_sigma > 0 else None
        return {"b_simple": b_simple, "g2": g2, "trace_sigma": trace_sigma}

    def state_dict(self) -> dict[str, float | int]:
        """Plain floats and ints: loads with torch.load(weights_only=True), and a resume continues exactly."""
        return {"ema": self.ema, "g2": self._g2, "trace_sigma": self._trace, "weight": self._weight,
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.ema = float(state["ema"])
        self._g2, self._trace = float(state["g2"]), float(state["trace_sigma"])
        self._weight, self.updates = float(state["weight"]), int(state["updates"])


def _sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum |t|^2 in fp32 at least (the run sums it into fp64).

    On CPU, BLAS dot products: 2.5x faster than a norm's reduction over one large tensor, measured; and for
    up to 4M elements one dot over their concatenation, since there the per-op overhead costs more than the
    copy (a 7k-parameter MLP: 12 us against 30 us for one dot per tensor). Elsewhere the fused multi-tensor
    norm.
    """
    if all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors):
        flats = [t.reshape(-1) for t in tensors]
        if len(flats) > 1 and sum(f.numel() for f in flats) <= 1 << 22 and len({f.dtype for f in flats}) == 1:
            flat = torch.cat(flats)
            return torch.dot(flat, flat)
        return torch.stack([torch.dot(f, f).double() for f in flats]).sum()
    return torch.nn.utils.get_total_norm([t.float() for t in tensors]).square()


class _Run:
    """Sums over the estimates of one pair of batch sizes since the last collect."""

    __slots__ = ("small", "big", "count")

    def __init__(self, device: torch.device) -> None:
        # float64: tr(Sigma) comes from the difference of the two sums, which can be a small part of either.
        self.small = torch.zeros(1, dtype=torch.float64, device=device)  # sum of the small-batch squared norms
        self.big = torch.zeros(1, dtype=torch.float64, device=device)  # the big-batch ones, one per estimate
        self.count = 0  # estimates (a Python int: no sync)


class _StepEstimates:
    """Squared norms summed on the device per pair of batch sizes; collect() turns them into mean estimates.

    The estimates are linear in both squared norms, so the estimate from summed norms is the sum of the
    per-step estimates: each step costs one or two in-place adds, and the formulas run once per collect.
    Linearity also makes averaging each rank's own estimate equal to estimating from the rank-averaged
    small-batch norm, and lets steps of different sizes (an epoch's short last step) mix correctly.
    """

    def __init__(self) -> None:
        self._runs: dict[tuple[int, int], _Run] = {}

    def _run(self, b_small: int, b_big: int, device: torch.device) -> _Run:
        run = self._runs.get((b_small, b_big))
        if run is None:
            if not 0 < b_small < b_big:
                raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
            run = self._runs[b_small, b_big] = _Run(device)
        return run

    def collect(self, all_reduce: AllReduce | None = None, device: torch.device | None = None
                ) -> tuple[float, float] | None:
        """Mean (|G|^2, tr(Sigma)) over every estimate since the last collect, on this rank and over ranks.

        A collective when all_reduce is given (an in-place SUM, e.g. spine.distributed.all_reduce_sum): every
        rank must call it at the same step. One all-reduce of three numbers and one host read. None if no
        estimate was added on any rank. `device` places the message on a rank that added none (default: the
        device of its sums, else cpu).
        """
        runs, self._runs = self._runs, {}
        if device is None:
            device = next(iter(runs.values())).small.device if runs else torch.device("cpu")
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for (b_small, b_big), run in runs.items():
            if not run.count:  # small-batch norms without their step's big one (collect inside a step)
                continue
            g2, trace_sigma = two_batch_estimates(run.small, b_small, run.big, b_big)
            sums[0] += g2[0]
            sums[1] += trace_sigma[0]
            sums[2] += run.count
        g2_sum, trace_sum, count = (all_reduce(sums) if all_reduce is not None else sums).tolist()
        return None if count == 0 else (g2_sum / count, trace_sum / count)

    def flush_into(self, estimator: NoiseScaleEstimator, all_reduce: AllReduce | None = None,
                   device: torch.device | None = None) -> bool:
        """collect() and feed the estimator; whether there was anything to feed (same answer on every rank)."""
        collected = self.collect(all_reduce, device)
        if collected is not None:
            estimator.update_estimates(*collected)
        return collected is not None


class DDPGradNoise(_StepEstimates):
    """Under DDP: a comm hook measures each rank's local gradient; the loop hands over the all-reduced one.

    In the loop:
        noise = DDPGradNoise(); ddp_model.register_comm_hook(noise, DDPGradNoise.hook)   # once, after DDP(...)
        ... synced backward of the step ...
        grad_norm = get_total_norm(...)                                   # the loop has it, before clipping
        noise.step_done(grad_norm, b_small=len(idx), b_big=len(idx) * world)   # two in-place adds, no sync
        every log_every steps, on every rank: noise.flush_into(estimator, all_reduce_sum)

    len(idx) is the per-rank step batch (micro-batch x accumulation steps): under no_sync the gradients of
    the micro-batches accumulate in .grad and the one synced backward hands their sum to the buckets.

    Cost: any Python comm hook costs more than DDP's C++ reduction; this one adds, to torch's reference
    averaging hook, one dot product per bucket and two in-place adds per step. every=n measures one
    synchronised step in n (the others run the plain averaging hook), for n times fewer of those.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, every: int = 1) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.process_group = process_group
        self.every = every
        self._synced_steps = 0  # step_done calls after a synchronised backward: which steps are measured
        self._pending: torch.Tensor | None = None  # this step's local squared norm, summed over its buckets
        self._buckets_done = False  # the last bucket of a synced backward passed through the hook

    @staticmethod
    def hook(state: "DDPGradNoise", bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """The standard averaging all-reduce, plus one dot product of the local, not yet averaged bucket.

        Averaging exactly as DDP's built-in reduction does, so training is bit-identical to training without
        the hook: multiply by 1/world, then SUM (not ReduceOp.AVG, unreliable on gloo). DDP multiplies by the
        reciprocal while copying the gradients into the bucket; a division (as in torch's reference
        allreduce_hook) differs from it in the last bit when the world size is not a power of two (measured
        at world 3: `python -m spine.instruments.cost`). Nothing is keyed on bucket.index(): DDP rebuilds its
        buckets after the first iteration, and only the sum over all buckets is used.
        """
        buffer = bucket.buffer()
        if state._synced_steps % state.every == 0:
            flat = buffer if buffer.dtype in (torch.float32, torch.float64) else buffer.float()  # fp32 at least
            square = torch.dot(flat, flat)  # BLAS: on CPU 2.5x faster than a norm's reduction, measured
            # The first bucket of a step starts a fresh tensor, so nothing ever needs zeroing.
            state._pending = square if state._pending is None else state._pending.add_(square)
        if bucket.is_last():
            state._buckets_done = True
        group = state.process_group if state.process_group is not None else dist.group.WORLD
        buffer.mul_(1.0 / group.size())
        return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])

    @property
    def local_sq_norm(self) -> torch.Tensor | None:
        """This rank's local squared gradient norm of the current step (summed over buckets), until step_done."""
        return self._pending

    def step_done(self, grad_norm: torch.Tensor, b_small: int, b_big: int) -> None:
        """After the step's synced backward: the norm of the all-reduced gradient (before clipping), the
        per-rank step batch and the global one. A step whose backward did not reach the hook adds nothing."""
        if self._buckets_done and self._pending is not None:
            run = self._run(b_small, b_big, self._pending.device)
            run.small.add_(self._pending)
            grad_norm = grad_norm.detach()
            run.big.addcmul_(grad_norm, grad_norm)
            run.count += 1
        self._synced_steps += self._buckets_done
        self._pending, self._buckets_done = None, False


class MicroBatchGradNoise(_StepEstimates):
    """World 1 with gradient accumulation: one micro-batch is the small batch, the step's k micro-batches the big.

    A tensor hook on each parameter sees the gradient of one backward before it is added into .grad. The
    loop scales each micro-batch's mean loss by weight = len(micro) / len(step), so the hook sees weight x
    the micro-batch's own mean gradient; the weight is divided back out (and gives the step's size).

    In the loop:
        noise = MicroBatchGradNoise(model.parameters())                    # once; noise.remove() at the end
        for micro ...:
            with noise.micro_batch(weight=len(micro_idx) / len(idx), size=len(micro_idx)):
                loss.backward()
        grad_norm = get_total_norm(...)                                    # before clipping
        noise.step_done(grad_norm)                                         # one in-place add, no sync
        every log_every steps: noise.flush_into(estimator)

    Only backwards inside micro_batch() are measured (the hooks also see torch.autograd.grad calls, e.g. the
    sharpness instrument's, which must not count). A step of one micro-batch (k = 1) has no second batch
    size and adds nothing.

    Cost: per measured micro-batch, a sum of squares of its gradients (dot products) and one in-place add;
    the hooks on the other backwards only test a flag. every=n measures one step in n.
    """

    def __init__(self, params: Iterable[torch.Tensor], every: int = 1) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.params = [p for p in params if p.requires_grad]
        self.every = every
        self._steps = 0  # step_done calls: which steps are measured
        self._measuring = False
        self._grads: list[torch.Tensor] = []  # the current backward's gradients, as the hooks saw them
        self._step_runs: dict[tuple[int, int], int] = {}  # micro-batches of this step per pair of sizes
        self._handles: list[RemovableHandle] = [p.register_hook(self._see) for p in self.params]

    def _see(self, grad: torch.Tensor) -> None:
        if self._measuring:
            self._grads.append(grad)  # only a reference; the norm is taken once, after the backward
        return None  # leave the gradient unchanged

    @contextmanager
    def micro_batch(self, weight: float, size: int) -> Iterator[None]:
        """Wrap one micro-batch's backward; weight = the factor its mean loss was multiplied by."""
        self._measuring, self._grads = self._steps % self.every == 0, []
        try:
            yield
        finally:
            self._measuring = False
        step_size = round(size / weight)
        if self._grads and size < step_size:
            square = _sum_of_squares(self._grads)
            run = self._run(size, step_size, square.device)
            run.small.add_(square, alpha=1.0 / (weight * weight))  # undo the loss weighting
            self._step_runs[size, step_size] = self._step_runs.get((size, step_size), 0) + 1
        self._grads = []

    def step_done(self, grad_norm: torch.Tensor) -> None:
        """After the step's last backward: the norm of the accumulated gradient (before clipping)."""
        grad_norm = grad_norm.detach()
        for key, micro_batches in self._step_runs.items():  # one pair of sizes, two when the last micro is short
            run = self._runs.get(key)
            if run is not None:  # None if a collect came between the micro-batches and this call
                run.big.addcmul_(grad_norm, grad_norm, value=float(micro_batches))
                run.count += micro_batches
        self._step_runs = {}
        self._steps += 1

    def remove(self) -> None:
        """Unregister the parameter hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
