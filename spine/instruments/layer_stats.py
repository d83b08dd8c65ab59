"""Per-layer health on a logged step: gradient and weight norms, update-to-weight ratios, activations.

On a logged step only (everything here costs copies and kernels the other steps must not pay):

    stats = LayerStats(model)            # once, on the unwrapped module
    stats.begin_step()                   # before the step's first forward: registers the forward hooks
    ... forward(s), backward(s) ...
    stats.before_optimizer_step()        # after the last backward, before clipping and optimizer.step()
    optimizer.step()
    tags = stats.end_step()              # after optimizer.step(): removes the hooks, one host read

What is measured:

- per parameter tensor: |grad| (the raw gradient: before clipping, like the loop's logged grad norm),
  |w| (just before the step) and the update-to-weight ratio |w_after - w_before| / |w_before| of this step
  (a rule of thumb puts healthy values near 1e-3). A parameter without a gradient gets no grad tag; one
  whose weights are all zero before the step (a fresh zero bias) gets no ratio tag.
- per leaf module (a module without children), at its output, over every call in the step (all
  micro-batches, shared modules called twice): mean and std (population, over all elements), and for
  nn.ReLU modules the fraction of dead units. A unit is one index along `unit_dim` of the output (1:
  features of a Linear's (N, F) output, channels of a conv's (N, C, H, W) map); it is dead when it is
  exactly zero for every sample (and every position) of the step. Functional relu calls are not modules
  and are not seen.

Under DDP the gradients and weights are identical on every rank after the all-reduce, but the activations
are per-rank. end_step(all_reduce=...) sums the activation statistics over ranks (a collective: every rank
calls it), making them those of the global batch; without it they are this rank's, and the loop logs rank 0.

Tags are grouped by layer for TensorBoard, which groups by the part before the first "/":
"layers.net.0/weight.grad_norm", "layers.net.0/weight.norm", "layers.net.0/weight.update_ratio",
"layers.net.1/act.mean", "layers.net.1/act.std", "layers.net.1/dead_fraction".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

AllReduce = Callable[[torch.Tensor], torch.Tensor]


class _Activations:
    """Sums over every call of one module in the step, so micro-batches and ranks combine exactly."""

    def __init__(self, track_dead: bool) -> None:
        self.track_dead = track_dead
        self.sums: torch.Tensor | None = None  # float64 (sum, sum of squares)
        self.count = 0  # elements seen
        self.alive: torch.Tensor | None = None  # per unit: calls in which it was non-zero somewhere


class LayerStats:
    """Per-layer statistics of one logged step (see the module docstring for the calls and what is measured).

    model: the module whose parameters and leaf modules are measured (a DDP wrapper is unwrapped);
    prefix: the first part of every tag; unit_dim: the output dimension that indexes a ReLU's units.
    """

    def __init__(self, model: nn.Module, prefix: str = "layers", unit_dim: int = 1) -> None:
        self.model = model.module if isinstance(model, DistributedDataParallel) else model
        self.prefix, self.unit_dim = prefix, unit_dim
        self.params = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self._handles: list[RemovableHandle] = []
        self._acts: dict[str, _Activations] = {}
        self._measured: list[tuple[str, torch.Tensor]] = []  # params with a grad: (name, weights before)
        self._grad_norms: torch.Tensor | None = None
        self._weight_norms: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        """Whether forward hooks are registered (between begin_step and end_step)."""
        return bool(self._handles)

    def _group(self, layer: str) -> str:
        return f"{self.prefix}.{layer}" if layer else self.prefix  # "" is the root module

    def _param_tag(self, qualified: str, what: str) -> str:
        layer, _, leaf = qualified.rpartition(".")
        return f"{self._group(layer)}/{leaf}.{what}"

    def begin_step(self) -> None:
        """Register a forward hook on every leaf module; they live until end_step (or remove)."""
        self.remove()
        self._acts = {}
        for name, module in self.model.named_modules():
            if next(module.children(), None) is None:
                self._acts[name] = _Activations(track_dead=isinstance(module, nn.ReLU))
                self._handles.append(module.register_forward_hook(self._hook_for(name)))

    def _hook_for(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return
            acts = self._acts[name]
            out = output.detach()  # statistics must not join the autograd graph
            wide = out.double()
            sums = torch.stack([wide.sum(), (wide * wide).sum()])
            acts.sums = sums if acts.sums is None else acts.sums + sums
            acts.count += out.numel()
            if acts.track_dead:
                # Units along unit_dim; a unit is alive in this call if it is non-zero anywhere in the batch.
                per_unit = out.movedim(self.unit_dim, 0).reshape(out.shape[self.unit_dim], -1) \
                    if out.dim() > self.unit_dim else out.reshape(1, -1)
                alive = per_unit.ne(0).any(1).double()
                acts.alive = alive if acts.alive is None else acts.alive + alive
        return hook

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Gradient norms, weight norms and a copy of the weights, just before the update."""
        self._measured = [(name, p.detach().clone()) for name, p in self.params if p.grad is not None]
        grads = [p.grad for _, p in self.params if p.grad is not None]
        self._grad_norms = _norms(grads)
        self._weight_norms = _norms([w for _, w in self._measured])

    @torch.no_grad()
    def end_step(self, all_reduce: AllReduce | None = None) -> dict[str, float]:
        """Tag -> value for this step; removes the hooks. With all_reduce, a collective (activations summed
        over ranks). One host read for everything."""
        self.remove()
        named = dict(self.params)
        parts: list[torch.Tensor] = []
        if self._measured:
            update_norms = _norms([named[name].detach() - before for name, before in self._measured])
            parts += [self._grad_norms, self._weight_norms, update_norms]
        acts = [(name, a) for name, a in self._acts.items() if a.sums is not None]
        if acts:
            device = acts[0][1].sums.device
            counts = torch.tensor([float(a.count) for _, a in acts], dtype=torch.float64, device=device)
            packed = torch.cat([a.sums for _, a in acts] + [counts]
                               + [a.alive for _, a in acts if a.alive is not None])
            if all_reduce is not None:
                packed = all_reduce(packed)
            parts.append(_activation_values(packed, [a for _, a in acts]))
        values = torch.cat([p.double().to(parts[0].device) for p in parts]).tolist() if parts else []

        tags: dict[str, float] = {}
        n = len(self._measured)
        for i, (name, _) in enumerate(self._measured):
            grad_norm, weight_norm, update_norm = values[i], values[n + i], values[2 * n + i]
            tags[self._param_tag(name, "grad_norm")] = grad_norm
            tags[self._param_tag(name, "norm")] = weight_norm
            if weight_norm > 0:
                tags[self._param_tag(name, "update_ratio")] = update_norm / weight_norm
        position = 3 * n
        for name, a in acts:
            tags[f"{self._group(name)}/act.mean"] = values[position]
            tags[f"{self._group(name)}/act.std"] = values[position + 1]
            position += 2
            if a.alive is not None:
                tags[f"{self._group(name)}/dead_fraction"] = values[position]
                position += 1
        self._measured, self._acts = [], {}
        return dict(sorted(tags.items()))  # grouped by layer

    def remove(self) -> None:
        """Remove the forward hooks (end_step does it; call this if a logged step is abandoned)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors])


def _activation_values(packed: torch.Tensor, acts: list[_Activations]) -> torch.Tensor:
    """From the packed (sums..., counts, alive...) vector: mean, std and, for ReLUs, the dead fraction, in order."""
    k = len(acts)
    sums, counts = packed[:2 * k].view(k, 2), packed[2 * k:3 * k]
    mean = sums[:, 0] / counts
    std = (sums[:, 1] / counts - mean * mean).clamp_min(0).sqrt()  # population std; clamp: rounding below 0
    out, offset = [], 3 * k
    for i, a in enumerate(acts):
        out += [mean[i:i + 1], std[i:i + 1]]
        if a.alive is not None:
            units = len(a.alive)
            out.append(packed[offset:offset + units].eq(0).double().mean().reshape(1))
            offset += units
    return torch.cat(out)
