"""Activation offloading (`config.training.activation_offloading`): the tensors the forward pass saves for backward
go to host memory as they are saved and come back when backward needs them, as torchtune's `OffloadActivations`,
TRL's `activation_offloading` and Axolotl's `activation_offloading: true` do.

    install(model)                   # once, after the method is applied (engine.prepare)
    with offloading(model):          # around the forward of a training step (engine.train_step, the executor)
        loss = model(**batch).loss
    loss.backward()                  # each saved tensor is copied back to the device when its node runs

Built on PyTorch's saved-tensor hooks (`torch.autograd.graph.saved_tensors_hooks`), the mechanism
`torch.autograd.graph.save_on_cpu` uses; the rules of what moves are torchtune's:

* parameters (and views of them: a Linear saves its weight) stay: they live on the device anyway;
* tensors under 1 KiB stay (the copy costs more than it saves);
* nothing from the output head on moves (the logits, the loss): backward needs them first, at once;
* with gradient checkpointing, the checkpointed blocks save nothing but their inputs, which move; the tensors
  recomputed in backward stay (they live only while their block's backward runs).

The same code runs in the fake-tensor simulation, the probes and the executor, so the estimate counts what is
trained: host copies are made under `advisor.memory.counter.host_allocations()`, which the live-bytes counter
leaves out (they are host memory), and a tensor restored in backward is a new device allocation. On a CUDA
device the host copies are pinned and the copies back are asynchronous; on a CPU device offloading moves nothing
off the device and only costs copies.
"""

from __future__ import annotations

import contextlib

import torch

MIN_BYTES = 1024
_STATE = "_advisor_activation_offload"


def _base(model: torch.nn.Module) -> torch.nn.Module:
    from advisor.losses import _base as base

    return base(model)


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def install(model: torch.nn.Module) -> None:
    """Prepare `model` for `offloading(model)`: remember its parameters' storages and stop offloading at the output
    head (whatever wraps it: PEFT, accelerate)."""
    base = _base(model)
    state = {"active": False, "paused": False, "params": set(), "model": model}
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is not None:
        def pause(*_args):
            state["paused"] = True

        head.register_forward_pre_hook(pause)
    setattr(base, _STATE, state)


def installed(model: torch.nn.Module) -> bool:
    return getattr(_base(model), _STATE, None) is not None


@contextlib.contextmanager
def offloading(model: torch.nn.Module):
    """Inside, the tensors autograd saves go to host memory (no-op where `install` was not called)."""
    state = getattr(_base(model), _STATE, None)
    if state is None:
        yield
        return
    # parameter storages now (a resumed or re-sharded model may have new ones)
    state["params"] = {k for k in (_storage_key(p) for p in state["model"].parameters()) if k is not None}
    state["paused"] = False

    def pack(t: torch.Tensor):
        if (state["paused"] or isinstance(t, torch.nn.Parameter)
                or t.numel() * t.element_size() < MIN_BYTES or _storage_key(t) in state["params"]):
            return t
        from advisor.memory.counter import host_allocations

        cuda = t.device.type == "cuda"
        with host_allocations():
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, device="cpu", pin_memory=cuda)
            host.copy_(t, non_blocking=cuda)
        return (t.device, host)

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=device.type == "cuda", copy=True)

    state["active"] = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        state["active"] = False
        state["paused"] = False
