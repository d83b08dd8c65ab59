"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training").

G is the full-batch gradient, Sigma the per-example gradient covariance. A batch of b samples gives
E|G_b|^2 = |G|^2 + tr(Sigma)/b, so squared gradient norms at two batch sizes b < B give unbiased estimates

    |G|^2     ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

One step's estimates are noisy (the |G|^2 one often negative), so NoiseScaleEstimator smooths numerator
and denominator separately and reports the ratio of the averages, never an average of ratios.

Two sources of the two batch sizes come for almost nothing in the loop:

- DDPGradNoise (world > 1): parameter hooks read each rank's *local* gradient (small batch: the
  per-rank step batch, micro-batch x accumulation steps under no_sync) before the all-reduce; the
  all-reduced .grad is the big batch (per-rank step batch x world size).
- MicroBatchGradNoise (world 1, gradient accumulation with k >= 2): each micro-batch's own gradient is the
  small batch, the step's accumulated gradient the big one.

Both keep the squared norms summed on the device (one or two in-place adds per step, no host sync) and hand
the estimates over at the loop's logging cadence, between steps: one all-reduce of three numbers, blocking with
`collect(all_reduce)` or, as the loop does, started at one flush and read at the next (DeferredFlush).

Squared norms are of the gradient as the loop computes it: before clipping. Under fp16 the hooks would see
gradients still multiplied by the loss scale, which is why --noise-scale refuses --precision fp16.
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


def mean_estimates(sums: torch.Tensor) -> tuple[float, float] | None:
    """(mean |G|^2, mean tr(Sigma)) from take_sums()'s three numbers (summed over ranks); None if none. A host read."""
    g2_sum, trace_sum, count = sums.tolist()
    return None if count == 0 else (g2_sum / count, trace_sum / count)


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
        sums = self.take_sums(device)
        return mean_estimates(all_reduce(sums) if all_reduce is not None else sums)

    def state_dict(self) -> list[list[float]]:
        """The sums not yet flushed, per pair of batch sizes, as plain numbers (a host read): with the
        estimator's state, what a resume needs to continue exactly. Call between steps."""
        return [[b_small, b_big, run.small.item(), run.big.item(), run.count]
                for (b_small, b_big), run in self._runs.items()]

    def load_state_dict(self, state: list[list[float]], device: torch.device) -> None:
        self._runs = {}
        for b_small, b_big, small, big, count in state:
            run = self._run(int(b_small), int(b_big), device)
            run.small.fill_(small)
            run.big.fill_(big)
            run.count = int(count)

    def take_sums(self, device: torch.device | None = None) -> torch.Tensor:
        """This rank's (sum of |G|^2 estimates, sum of tr(Sigma) estimates, count) since the last take, as one
        float64 tensor on the device (no host sync), and start afresh. Summed over ranks, mean_estimates()
        turns it into collect()'s answer."""
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
        return sums

    def flush_into(self, estimator: NoiseScaleEstimator, all_reduce: AllReduce | None = None,
                   device: torch.device | None = None) -> bool:
        """collect() and feed the estimator; whether there was anything to feed (same answer on every rank)."""
        collected = self.collect(all_reduce, device)
        if collected is not None:
            estimator.update_estimates(*collected)
        return collected is not None


class DDPGradNoise(_StepEstimates):
    """Under DDP: parameter hooks read each rank's local gradient; the loop hands over the all-reduced one.

    In the loop:
        noise = DDPGradNoise(model.parameters())                          # once; `measure` set per step
        for each micro-batch:  with noise.backward(): loss.backward()     # under no_sync but the last
        grad_norm = get_total_norm(...)                                   # the loop has it, before clipping
        noise.step_done(grad_norm, b_small=len(idx), b_big=len(idx) * world)   # two in-place adds, no sync
        every log_every steps, on every rank: noise.flush_into(estimator, all_reduce_sum)  # or DeferredFlush

    Why the hooks see the local gradient: DDP (with gradient_as_bucket_view off, its default) copies each
    .grad into a bucket and all-reduces the bucket; only when the backward ends does it copy the averaged
    bucket back into .grad. A post-accumulate-grad hook runs as soon as .grad has been accumulated, before
    that copy. Under no_sync the micro-batches' gradients add up in .grad, so the hooks of the step's last
    (synchronised) backward see the rank's whole step gradient: each backward restarts the sum, the last
    one's stays. len(idx) is that per-rank step batch (micro-batch x accumulation steps).

    Cost: nothing on a step that is not measured. The hooks exist only inside a measured backward, and DDP's
    own C++ reduction is never replaced (an earlier version used a Python communication hook on every step;
    `python -m spine.instruments.cost` times torch's own Python averaging hook beside plain DDP). A measured
    backward pays one Python call and one dot product per parameter tensor; the loop measures the steps whose
    grad norm it computes anyway.
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.params = [p for p in params if p.requires_grad]
        self.measure = True  # whether the coming step is measured; the loop sets it per step
        self._pending: torch.Tensor | None = None  # this backward's local squared norm, summed over tensors
        self._complete = False  # a measured backward ran to its end since the last step_done

    def _see(self, param: torch.Tensor) -> None:
        grad = param.grad.reshape(-1)
        flat = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()  # fp32 at least
        square = torch.dot(flat, flat)  # BLAS: on CPU 2.5x faster than a norm's reduction, measured
        self._pending = square.double() if self._pending is None else self._pending.add_(square)

    @contextmanager
    def backward(self) -> Iterator[None]:
        """Wrap each backward of the step; measures only when `measure` is set."""
        if not self.measure:
            yield
            return
        self._pending, self._complete = None, False  # a later backward of the step supersedes an earlier one
        handles = self._register_hooks()
        try:
            yield
            self._complete = True
        finally:
            self._remove_hooks(handles)

    # Registration and removal are methods of their own so make bench can clock them (launch/bench_worker.py).
    def _register_hooks(self) -> list[RemovableHandle]:
        return [p.register_post_accumulate_grad_hook(self._see) for p in self.params]

    def _remove_hooks(self, handles: list[RemovableHandle]) -> None:
        for handle in handles:
            handle.remove()

    @property
    def local_sq_norm(self) -> torch.Tensor | None:
        """This rank's local squared gradient norm of the current step (its last backward), until step_done."""
        return self._pending

    def step_done(self, grad_norm: torch.Tensor | None, b_small: int, b_big: int) -> None:
        """After the step's synced backward: the norm of the all-reduced gradient (before clipping; None on a
        step not measured), the per-rank step batch and the global one. A step not measured adds nothing."""
        if self._complete and self._pending is not None:
            run = self._run(b_small, b_big, self._pending.device)
            run.small.add_(self._pending)
            grad_norm = grad_norm.detach()
            run.big.addcmul_(grad_norm, grad_norm)
            run.count += 1
        self._pending, self._complete = None, False


class MicroBatchGradNoise(_StepEstimates):
    """World 1 with gradient accumulation: one micro-batch is the small batch, the step's k micro-batches the big.

    A tensor hook on each parameter sees the gradient of one backward before it is added into .grad. The
    loop scales each micro-batch's mean loss by weight = len(micro) / len(step), so the hook sees weight x
    the micro-batch's own mean gradient; the weight is divided back out (and gives the step's size).

    In the loop:
        noise = MicroBatchGradNoise(model.parameters())                    # once; `measure` set per step
        for micro ...:
            with noise.micro_batch(weight=len(micro_idx) / len(idx), size=len(micro_idx)):
                loss.backward()
        grad_norm = get_total_norm(...)                                    # before clipping
        noise.step_done(grad_norm)                                         # one in-place add, no sync
        every log_every steps: noise.flush_into(estimator)

    The hooks exist only inside a measured micro_batch(), so no other backward is seen (the sharpness
    instrument's torch.autograd.grad calls must not count). A step of one micro-batch (k = 1) has no second
    batch size and adds nothing.

    Cost: per measured micro-batch, a sum of squares of its gradients (dot products) and one in-place add;
    nothing on a step that is not measured.
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.params = [p for p in params if p.requires_grad]
        self.measure = True  # whether the coming step's micro-batches are measured; the loop sets it per step
        self._grads: list[torch.Tensor] = []  # the current backward's gradients, as the hooks saw them
        self._step_runs: dict[tuple[int, int], int] = {}  # micro-batches of this step per pair of sizes

    def _see(self, grad: torch.Tensor) -> None:
        self._grads.append(grad)  # only a reference; the norm is taken once, after the backward
        return None  # leave the gradient unchanged

    @contextmanager
    def micro_batch(self, weight: float, size: int) -> Iterator[None]:
        """Wrap one micro-batch's backward; weight = the factor its mean loss was multiplied by. The hooks
        exist only inside a measured micro-batch: a step not measured pays nothing."""
        if not self.measure:
            yield
            return
        self._grads = []
        handles = [p.register_hook(self._see) for p in self.params]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        step_size = round(size / weight)
        if self._grads and size < step_size:
            square = _sum_of_squares(self._grads)
            run = self._run(size, step_size, square.device)
            run.small.add_(square, alpha=1.0 / (weight * weight))  # undo the loss weighting
            self._step_runs[size, step_size] = self._step_runs.get((size, step_size), 0) + 1
        self._grads = []

    def step_done(self, grad_norm: torch.Tensor | None) -> None:
        """After the step's last backward: the norm of the accumulated gradient (before clipping); None is
        allowed on a step that was not measured."""
        if not self._step_runs:
            return
        grad_norm = grad_norm.detach()
        for key, micro_batches in self._step_runs.items():  # one pair of sizes, two when the last micro is short
            run = self._runs.get(key)
            if run is not None:  # None if a collect came between the micro-batches and this call
                run.big.addcmul_(grad_norm, grad_norm, value=float(micro_batches))
                run.count += micro_batches
        self._step_runs = {}


class DeferredFlush:
    """Feeds an estimator from a source on every rank without making any rank wait at a flush.

    Each flush() takes this interval's sums, starts their all-reduce and completes the previous flush's, so the
    estimator runs one logging interval behind; finish() completes the last. A blocking all-reduce of the three
    numbers made each rank wait, at every flush, for the slower rank and the round trip: before this, the
    largest part of the instrument's own time in make bench's world-2 case. Started in the same order on every
    rank, the all-reduces pair up as any collective does. At world 1 (no process group) a flush completes at once.

        flush = DeferredFlush(source, estimator, device)
        every log_every steps, on every rank:   done_at = flush.flush(step)    # a step whose estimate came in
        at the end, on every rank:              done_at = flush.finish()
    """

    def __init__(self, source: _StepEstimates, estimator: NoiseScaleEstimator, device: torch.device) -> None:
        self.source, self.estimator, self.device = source, estimator, device
        self._pending: tuple[int, torch.Tensor, object] | None = None  # (step, sums, the all-reduce's work)

    def flush(self, step: int) -> int | None:
        """Start the all-reduce of the sums up to `step`; complete the previous one. Returns the step of the
        estimate that entered the estimator (this one at world 1, the previous flush's under DDP), or None."""
        sums = self.source.take_sums(self.device)
        work = dist.all_reduce(sums, op=dist.ReduceOp.SUM, async_op=True) if dist.is_initialized() else None
        done_at = self.finish()
        self._pending = (step, sums, work)
        return self.finish() if work is None else done_at

    def finish(self) -> int | None:
        """Complete the pending all-reduce, if any, and feed its estimate; its step, or None if nothing came in."""
        if self._pending is None:
            return None
        (step, sums, work), self._pending = self._pending, None
        if work is not None:
            work.wait()
        estimates = mean_estimates(sums)
        if estimates is None:
            return None
        self.estimator.update_estimates(*estimates)
        return step
