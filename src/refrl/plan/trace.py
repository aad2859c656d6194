"""Activation memory of one training micro-batch, traced under fake tensors.

The network is built on the meta device, its parameters and buffers replaced by fake
tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no storage), and run through
one forward + backward of the flow-matching loss under
``torch.distributed._tools.mem_tracker.MemTracker``, which attributes every tensor the
step creates to a category (parameter, gradient, activation, temporary, ...) and keeps
the peak. Nothing is allocated for real, so a 20B transformer traces on a laptop.

The result is what the step adds on top of the resident weights: activations and
temporaries at the peak, and the gradients alive then (the parameter gradients are
reported apart by the plan, from the trainable parameters).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Trace:
    """Bytes at the peak of one forward + backward (see module docstring)."""

    activations: int  # activations + temporaries at the peak
    gradients: int  # parameter gradients alive at the peak
    peak_above_weights: int  # everything the step added at its peak

    def as_dict(self) -> dict[str, int]:
        return {"activations": self.activations, "gradients": self.gradients,
                "peak_above_weights": self.peak_above_weights}


def trace_step(build: Callable[[], nn.Module], step: Callable[[nn.Module], torch.Tensor]) -> Trace:
    """Trace ``step(module).backward()`` for the module ``build()`` makes on the meta device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        module = build()
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_materialize(module)
        tracker = _FrozenAwareTracker()
        tracker.track_external(module)
        with tracker, warnings.catch_warnings():
            # ModTracker's note on modules already freed when backward reaches them: nothing lost for the peak
            warnings.filterwarnings("ignore", message="Module is None")
            _Step(module, step)().backward()
        peak = _sum_devices(tracker.get_tracker_snapshot("peak"))
    act = peak.get("Activation", 0) + peak.get("Temp", 0)
    grads = peak.get("Gradient", 0)
    return Trace(activations=act, gradients=grads, peak_above_weights=act + grads + peak.get("Other", 0))


def _tracker_class() -> type:
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class FrozenAwareTracker(MemTracker):
        """MemTracker that hooks gradients only of parameters that get one (it would fail on
        frozen weights, e.g. the base weights under LoRA)."""

        def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
            memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for param in module.parameters():
                    if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                        def hook(g: torch.Tensor) -> None:
                            self._update_and_maybe_create_winfos(g, _MemRefType.GRAD)

                        self._param_to_grad_hook_handles[param] = (
                            param.register_hook(hook),
                            param.register_post_accumulate_grad_hook(lambda p, hook=hook: hook(p.grad)),
                        )
            return memory

    return FrozenAwareTracker


def _FrozenAwareTracker():  # noqa: N802 (a class, built on first use: torch's tools import lazily)
    return _tracker_class()()


def fake_materialize(module: nn.Module) -> None:
    """Replace every meta parameter and buffer by an empty tensor of the same shape and dtype
    (a fake one under FakeTensorMode); ``nn.Module.to_empty`` cannot swap fake parameters."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)


class _Step(nn.Module):
    """Runs ``step(module)`` as a forward: MemTracker refuses a module called twice from no parent
    (e.g. an embedding used twice by a policy method that is not ``forward``)."""

    def __init__(self, module: nn.Module, step: Callable[[nn.Module], torch.Tensor]):
        super().__init__()
        self.module = module
        self.fn = step

    def forward(self) -> torch.Tensor:
        return self.fn(self.module)


def _sum_devices(snapshot: dict[Any, dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for per_device in snapshot.values():
        for k, v in per_device.items():
            out[k] = out.get(k, 0) + int(v)
    return out
