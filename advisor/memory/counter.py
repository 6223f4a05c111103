"""Exact live-bytes accounting of a training step.

`LiveBytes` is a `TorchDispatchMode` that sees every tensor an ATen op returns, tracks each distinct
storage once through a weak reference (its bytes leave the count when the storage is freed), and keeps
the running total and its peak per category. It works unchanged on real, fake and meta tensors, which is
what makes the simulator (fake tensors) and a real run directly comparable.

Categories (the breakdown users see):

* ``weights``      frozen parameters and buffers
* ``trainable``    parameters with ``requires_grad``
* ``gradients``    ``.grad`` of trainable parameters (reclassified when accumulated)
* ``optimizer``    optimizer state (exp_avg, exp_avg_sq, GaLore projectors ...)
* ``activations``  tensors created in the forward pass up to the output head
* ``logits``       tensors created in the forward pass from the output head on (logits, fp32 upcast, loss)
* ``temporaries``  tensors created in backward or by the optimizer step that are not state
* ``inputs``       the batch

Storages created before the counter started and never registered are not counted; register the model,
the optimizer and the batch so the totals are complete.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = (
    "weights",
    "trainable",
    "gradients",
    "optimizer",
    "activations",
    "logits",
    "temporaries",
    "inputs",
)
PHASES = ("setup", "forward", "backward", "optimizer")

_PHASE_DEFAULT_CATEGORY = {
    "setup": "temporaries",
    "forward": "activations",
    "backward": "temporaries",
    "optimizer": "temporaries",
}


def _each_tensor(out, fn) -> None:
    """`fn(t)` for every tensor in an op's output, in pytree order: what `tree_map_only(torch.Tensor, fn, out)` visits,
    without building the mapped copy (an op's output is a tensor, a tuple or list of them, or a scalar; the pytree
    walk cost ~50 µs per op, 13% of a simulation)."""
    if isinstance(out, torch.Tensor):
        fn(out)
    elif isinstance(out, (tuple, list)):
        for x in out:
            _each_tensor(x, fn)
    elif out is not None and not isinstance(out, (int, float, bool, str, torch.dtype, torch.device)):
        tree_map_only(torch.Tensor, fn, out)


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):  # sparse or opaque tensors own no plain storage
        return []


@dataclass
class _Entry:
    nbytes: int
    category: str
    seq: int = 0  # its allocation's number in `allocation_events`


@dataclass
class PhasePeak:
    """The highest total reached within one phase, with the breakdown at that moment."""

    peak_bytes: int = 0
    breakdown: dict[str, int] = field(default_factory=dict)


@dataclass
class MemoryReport:
    peak_bytes: int
    peak_phase: str
    breakdown_at_peak: dict[str, int]
    phases: dict[str, PhasePeak]
    end_bytes: int
    cuda: dict[str, int] | None = None

    def to_dict(self) -> dict:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_gib": self.peak_bytes / 2**30,
            "peak_phase": self.peak_phase,
            "breakdown_at_peak_bytes": dict(self.breakdown_at_peak),
            "phases": {
                name: {"peak_bytes": p.peak_bytes, "breakdown_bytes": dict(p.breakdown)}
                for name, p in self.phases.items()
            },
            "end_bytes": self.end_bytes,
            "cuda": self.cuda,
        }


class LiveBytes(TorchDispatchMode):
    """Counts live tensor storage bytes, with a per-category breakdown and per-phase peaks.

    Usage::

        counter = LiveBytes()
        counter.register_model(model); counter.register_batch(batch)
        with counter:
            with counter.phase("forward"):  loss = model(**batch).loss
            with counter.phase("backward"): loss.backward()
            with counter.phase("optimizer"): opt.step(); opt.zero_grad()
        report = counter.report()
    """

    def __init__(self, see_inside: dict | None = None, record_allocations: bool = False) -> None:
        """`see_inside` maps an op name ("ns::op") to its Python kernel, run under the counter so that the
        temporaries it allocates internally are counted (a custom op is otherwise opaque to a dispatch mode).
        `record_allocations` keeps the ordered trace of storage allocations and frees in `allocation_events`
        (("alloc", n, nbytes) / ("free", n, 0) / ("mark", label, 0)), which `advisor.memory.allocator` replays
        through a model of the CUDA caching allocator."""
        super().__init__()
        self.allocation_events: list[tuple[str, object, int]] | None = [] if record_allocations else None
        self._seq = 0
        self._see_inside = see_inside or {}
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: list[weakref.ref] = []
        self._current: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self._total = 0
        self._peak = 0
        self._peak_phase = "setup"
        self._peak_breakdown: dict[str, int] = dict(self._current)
        self._phase = "setup"
        self._phase_peaks: dict[str, PhasePeak] = {}
        self._in_head = 0
        self._past_head = False
        self._host = 0  # > 0 inside `host_allocations()`
        self._hook_handles: list = []
        self._optimizers: list[torch.optim.Optimizer] = []
        # backward windows (see `_block_hooks`): which sub-windows of backward are active, and the blocks seen
        self._windows: set[str] = set()
        self._blocks_called = 0
        self._seams: set[int] = set()  # call indices of blocks that start a stack after another (T5 decoder)
        self._last_stack: int | None = None
        self._stack_of: dict[int, int] = {}
        self._blocks_inside: set[int] = set()

    # ------------------------------------------------------------------ bookkeeping
    def _on_free(self, entry: _Entry, _ref: weakref.ref) -> None:
        self._current[entry.category] -= entry.nbytes
        self._total -= entry.nbytes
        if self.allocation_events is not None:
            self.allocation_events.append(("free", entry.seq, 0))

    def _record_alloc(self, entry: _Entry) -> None:
        if self.allocation_events is not None:
            self._seq += 1
            entry.seq = self._seq
            self.allocation_events.append(("alloc", entry.seq, entry.nbytes))

    def mark(self, label: str) -> None:
        """A named point in the allocation trace (the replay places the device's library workspaces there)."""
        if self.allocation_events is not None:
            self.allocation_events.append(("mark", label, 0))

    def _track(self, t: torch.Tensor, category: str) -> None:
        for st in _storages(t):
            entry = self._entries.get(st)
            if entry is not None:
                nbytes = st.nbytes()
                if nbytes != entry.nbytes:  # resized in place
                    self._current[entry.category] += nbytes - entry.nbytes
                    self._total += nbytes - entry.nbytes
                    entry.nbytes = nbytes
                    if self.allocation_events is not None:  # a new block for the allocator
                        self.allocation_events.append(("free", entry.seq, 0))
                        self._record_alloc(entry)
                continue
            entry = _Entry(st.nbytes(), category)
            self._record_alloc(entry)
            self._entries[st] = entry
            self._refs.append(weakref.ref(st, lambda ref, e=entry: self._on_free(e, ref)))
            self._current[category] += entry.nbytes
            self._total += entry.nbytes
        self._update_peak()

    def _reclassify(self, t: torch.Tensor | None, category: str) -> None:
        if t is None:
            return
        for st in _storages(t):
            entry = self._entries.get(st)
            if entry is None:
                self._track(t, category)
                return
            if entry.category != category:
                self._current[entry.category] -= entry.nbytes
                self._current[category] += entry.nbytes
                entry.category = category

    def _update_peak(self) -> None:
        pp = self._phase_peaks.setdefault(self._phase, PhasePeak())
        if self._total > pp.peak_bytes:
            pp.peak_bytes = self._total
            pp.breakdown = {k: v for k, v in self._current.items() if v}
        for window in self._windows:
            wp = self._phase_peaks.setdefault(f"{self._phase}_{window}", PhasePeak())
            if self._total > wp.peak_bytes:
                wp.peak_bytes = self._total
                wp.breakdown = {k: v for k, v in self._current.items() if v}
        if self._total > self._peak:
            self._peak = self._total
            self._peak_phase = self._phase
            self._peak_breakdown = {k: v for k, v in self._current.items() if v}

    # ------------------------------------------------------------------ registration
    def register(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t, category)

    def register_model(self, model: torch.nn.Module) -> None:
        """Count the model's parameters and buffers; tag the output head so logits are separated."""
        for p in model.parameters():
            self._track(p, "trainable" if p.requires_grad else "weights")
            if p.requires_grad:
                self._hook_handles.append(
                    p.register_post_accumulate_grad_hook(lambda q: self._reclassify(q.grad, "gradients"))
                )
        for b in model.buffers():
            self._track(b, "weights")
        head = _output_head(model)
        if head is not None:
            self._hook_handles.append(head.register_forward_pre_hook(self._enter_head))
            self._hook_handles.append(head.register_forward_hook(self._leave_head))
        self._stack_of = {}
        for stack, blocks in enumerate(_block_stacks(model)):
            for block in blocks:
                self._stack_of[id(block)] = stack
                self._hook_handles.append(block.register_forward_hook(self._on_block_forward, with_kwargs=True))

    # ------------------------------------------------------------------ backward windows
    # Backward is split into windows whose composition is linear in the depth and the micro-batch, so that slice
    # simulations (1-2 blocks) extrapolate each of them exactly: `head` (loss and output head, before the top
    # block's backward), `first` (the top block's backward), `last` (the bottom block's), `tail` (after it:
    # embeddings). The whole-backward peak of a deep model is at one of them: between blocks the live bytes
    # change linearly with the number of blocks done (activations released, gradients accumulated), so their
    # maximum is at an end. Marked by tensor hooks on each block's output (its backward starts) and input (it ends).
    # A model of two stacks (T5's encoder and decoder) is linear within each stack but not across them: its backward
    # also peaks at the seam, in the upper stack's bottom block (`seam_upper`: the decoder's first block, whose
    # backward starts with every other decoder gradient accumulated) or the lower stack's top block (`seam_lower`).
    def _on_block_forward(self, module, args, kwargs, output) -> None:
        if self._phase != "forward" or not torch.is_grad_enabled():
            return  # checkpointed blocks run again during backward: only the first forward marks the windows
        index = self._blocks_called
        self._blocks_called += 1
        stack = self._stack_of.get(id(module))
        if index and stack != self._last_stack:
            self._seams.add(index)  # the first block called of a stack after another one's
        self._last_stack = stack
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda _g, i=index: self._block_backward(i, True))
        if isinstance(inp, torch.Tensor) and inp.requires_grad:
            inp.register_hook(lambda _g, i=index: self._block_backward(i, False))

    def _block_backward(self, index: int, starting: bool) -> None:
        if starting:
            self._blocks_inside.add(index)
        else:
            self._blocks_inside.discard(index)
        top, windows = self._blocks_called - 1, set()
        if top in self._blocks_inside:
            windows.add("first")
        if 0 in self._blocks_inside:
            windows.add("last")
        if not starting and index == 0:
            windows.add("tail")
        for seam in self._seams:
            if seam in self._blocks_inside:
                windows.add("seam_upper")
            if seam - 1 in self._blocks_inside:
                windows.add("seam_lower")
        self._windows = windows

    def register_batch(self, batch: dict) -> None:
        """Count the batch's tensors as inputs (also a batch made while counting, filed first as its phase's)."""
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                self._reclassify(v, "inputs")
        self._update_peak()

    def register_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Count existing state now; state created inside a step is reclassified as ``optimizer`` after it."""
        self._optimizers.append(optimizer)
        self.classify_optimizer_state()

    def _enter_head(self, *_args) -> None:
        if self._phase == "forward":
            self._in_head += 1
            self._past_head = True

    def _leave_head(self, *_args) -> None:
        if self._phase == "forward":
            self._in_head -= 1

    def classify_optimizer_state(self) -> None:
        """File every tensor the registered optimizers hold now under ``optimizer`` (done after each step; GaLore's
        projection refresh calls it inside the step, where a new projection matrix replaces the old)."""
        for opt in self._optimizers:
            for state in opt.state.values():
                for v in state.values() if isinstance(state, dict) else ():
                    if isinstance(v, torch.Tensor):
                        self._reclassify(v, "optimizer")
                    elif hasattr(v, "ortho_matrix"):  # GaLore projector objects
                        m = v.ortho_matrix
                        for t in m if isinstance(m, (list, tuple)) else [m]:
                            if isinstance(t, torch.Tensor):
                                self._reclassify(t, "optimizer")

    # ------------------------------------------------------------------ phases
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {name!r}")
        previous, self._phase = self._phase, name
        self._past_head = False
        if name == "forward":
            self._blocks_called, self._seams, self._last_stack = 0, set(), None
        if name == "backward":
            self._windows, self._blocks_inside = {"head"}, set()
        try:
            yield
        finally:
            if name == "optimizer":
                self.classify_optimizer_state()
            if name == "backward":
                for opt in self._optimizers:
                    for group in opt.param_groups:
                        for p in group["params"]:
                            self._reclassify(p.grad, "gradients")
            self._phase = previous
            self._past_head = False
            self._windows = set()

    # torch.compile (config.training.torch_compile) runs its compiled graphs under this mode instead of falling back
    # to eager, as it does for a user mode by default: with the backend the simulation uses
    # (aot_eager_decomp_partition) every aten op of the forward and backward graphs still comes through here, with
    # the saved activations the partitioner chose. Higher-order operators of compiled graphs (run_and_save_rng_state
    # under checkpointing) come as a whole: their outputs are counted
    supports_higher_order_operators = True

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not hasattr(func, "_schema"):  # a higher-order operator
            out = func(*args, **(kwargs or {}))
            if not self._host:
                category = _PHASE_DEFAULT_CATEGORY[self._phase]
                _each_tensor(out, lambda t: self._track(t, category))
            return out
        kernel = self._see_inside.get(func._schema.name) if self._see_inside else None
        if kernel is not None:
            with self:
                return kernel(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if self._host:  # host memory (offloaded activations): not the device's
            return out
        category = _PHASE_DEFAULT_CATEGORY[self._phase]
        if self._phase == "forward" and self._past_head:
            category = "logits"
        _each_tensor(out, lambda t: self._track(t, category))
        return out

    # ------------------------------------------------------------------ results
    @property
    def current_bytes(self) -> int:
        return self._total

    @property
    def peak_bytes(self) -> int:
        return self._peak

    def current_breakdown(self) -> dict[str, int]:
        return {k: v for k, v in self._current.items() if v}

    def reset_peak(self) -> None:
        """Start a new peak window from the current live total (e.g. after a warm-up step)."""
        self._peak = self._total
        self._peak_phase = self._phase
        self._peak_breakdown = self.current_breakdown()
        self._phase_peaks = {}

    def report(self) -> MemoryReport:
        return MemoryReport(
            peak_bytes=self._peak,
            peak_phase=self._peak_phase,
            breakdown_at_peak=dict(self._peak_breakdown),
            phases=dict(self._phase_peaks),
            end_bytes=self._total,
        )

    def close(self) -> None:
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()


def named_block_stacks(model: torch.nn.Module) -> list[tuple[str, list[torch.nn.Module]]]:
    """The model's stacks of repeated blocks with their module names: the outermost ModuleLists of identical modules
    that hold parameters (decoder layers; T5's encoder blocks and its decoder blocks), not lists nested inside them
    (MoLoRA experts)."""
    out: list[tuple[str, list[torch.nn.Module]]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0 or len({type(m) for m in mod}) != 1:
            continue
        if any(name.startswith(f + ".") for f, _ in out) or next(mod.parameters(), None) is None:
            continue
        out.append((name, list(mod)))
    return out


def _block_stacks(model: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """The blocks of each stack (`named_block_stacks`)."""
    return [blocks for _, blocks in named_block_stacks(model)]


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block of every stack (`_block_stacks`), in module order."""
    return [block for stack in _block_stacks(model) for block in stack]


def _output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if getter else None
    except (AttributeError, NotImplementedError):
        head = None
    return head if isinstance(head, torch.nn.Module) else None


def cuda_memory_stats(device: int | None = None) -> dict[str, int] | None:
    """Allocator statistics to store next to the counter's figures on CUDA; None elsewhere."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return {
        "max_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "max_reserved_bytes": torch.cuda.max_memory_reserved(device),
        "allocated_bytes": torch.cuda.memory_allocated(device),
        "reserved_bytes": torch.cuda.memory_reserved(device),
        "device_used_bytes": total - free,
        "device_total_bytes": total,
        # what the process holds beyond the caching allocator: CUDA context, cuBLAS/cuDNN workspaces
        "context_bytes": max(0, (total - free) - torch.cuda.memory_reserved(device)),
    }


@contextlib.contextmanager
def host_allocations() -> Iterator[None]:
    """Tensors made inside are host memory (activation offloading's copies, `advisor.offload`): every live-bytes
    counter watching leaves them out of the device's count."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    counters = [m for m in _get_current_dispatch_mode_stack() if isinstance(m, LiveBytes)]
    for c in counters:
        c._host += 1
    try:
        yield
    finally:
        for c in counters:
            c._host -= 1
