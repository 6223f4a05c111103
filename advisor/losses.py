"""The language-model loss without the whole fp32 logits tensor: chunked and fused-linear cross-entropy.

`config.training.cross_entropy` picks how a causal LM's next-token loss is computed in every path that runs a
training step (the exact simulation, the calibration probes, the executor), so the estimate counts what is trained:

* ``standard`` -- the model's output head makes the logits of every position at once and transformers' loss upcasts
  them to fp32; log-softmax keeps an fp32 copy for backward. Peak ≈ 12 bytes per (token × vocabulary entry).
* ``chunked`` -- torchtune's ``CEWithChunkedOutputLoss`` (``num_output_chunks = 8``): the head runs on 8 slices of
  the sequence, each slice's logits are upcast and reduced one at a time. The compute-dtype logits (2 B) and the
  fp32 log-probabilities (4 B) of every slice are kept for backward; the fp32 upcast exists for one slice only.
* ``fused_linear`` -- Liger Kernel's ``LigerFusedLinearCrossEntropyLoss``: the head and the loss run together on
  chunks of tokens, the gradient of each chunk's logits is computed in the forward pass and turned at once into
  the gradient of the hidden states (and of the head's weight when it is trained), so no logits outlive their
  chunk. Chunk size as Liger's: next_power_of_2(ceil(tokens / ceil(vocabulary / hidden))), about as many
  elements as the hidden states. Kept for backward: d(hidden) (tokens × hidden, compute dtype) and d(weight).

Implemented here in PyTorch (Liger's kernels are Triton, GPU only), so CPU probes and CPU jobs run the same
algorithm; on a GPU Liger's own kernel holds a chunk's logits in the compute dtype where this one also makes an
fp32 copy of the chunk (6 instead of 2 bytes per chunk element: a few hundred MB at most, so the estimate of a
Liger run errs on the safe side). Causal LMs whose head output goes straight into transformers' loss function only:
a model that post-processes its logits (Gemma-2's soft-capping, Cohere's logit scale, Granite's logits scaling) or
computes its loss itself (encoder-decoders) is refused with the field named.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import types

import torch
import torch.nn.functional as F

MODES = ("standard", "chunked", "fused_linear")
# how a compiled run compiles the chunked loss; in cache keys of compiled chunked configs (changed 2026-11-23: the
# whole loss function with the head's matmuls was one graph before, which held every slice's backward at once)
COMPILED_CHUNKED_LOSS = "per-slice cross-entropy"


def loss_graph_key(training) -> dict:
    """What cache keys add for the compiled chunked loss (nothing for any other configuration); `training` is a
    TrainingConfig or its dumped dict (a simulation payload's)."""
    get = training.get if isinstance(training, dict) else lambda k, d=None: getattr(training, k, d)
    if get("cross_entropy") == "chunked" and get("torch_compile", False):
        return {"compiled_loss": COMPILED_CHUNKED_LOSS}
    return {}
TORCHTUNE_CHUNKS = 8  # torchtune's CEWithChunkedOutputLoss(num_output_chunks=8)
IGNORE_INDEX = -100
FIELD = "config.training.cross_entropy"
_STATE = "_advisor_cross_entropy"
# config attributes that make a model change its logits between the head and the loss
_POST_PROCESSING = (("final_logit_softcapping", None), ("logit_scale", None), ("logits_scaling", 1.0))


def _refuse(message: str):
    from advisor.errors import AdvisorInputError

    return AdvisorInputError(FIELD, message, allowed=list(MODES))


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_supported(model: torch.nn.Module, kind: str, mode: str) -> None:
    """Raise AdvisorInputError (field config.training.cross_entropy) where `mode` cannot run on this model."""
    if mode == "standard":
        return
    if mode not in MODES:
        raise _refuse(f"unknown cross-entropy {mode!r}")
    if kind == "seq2seq":
        raise _refuse(f"{mode} cross-entropy is for causal language models; {kind} models compute their loss "
                      "themselves: use 'standard'")
    base = _base(model)
    cfg = getattr(base, "config", None)
    for attr, neutral in _POST_PROCESSING:
        value = getattr(cfg, attr, neutral)
        if mode == "chunked" and attr == "final_logit_softcapping":
            continue  # Gemma-2's soft-capping is applied to each slice's logits (`_chunked_sum`)
        if value is not None and value != neutral:
            raise _refuse(f"{type(base).__name__} changes its logits after the output head ({attr}={value}), which "
                          f"{mode} cross-entropy does not reproduce: use 'standard'")
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        source = ""
    if "self.loss_function(" not in source:
        raise _refuse(f"{type(base).__name__} computes its loss without transformers' loss_function: use 'standard'")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if mode == "chunked" and isinstance(head, torch.nn.Module):
        return  # each slice goes through the head module itself: a LoRA adapter on lm_head runs with it
    if type(head) is not torch.nn.Linear:
        raise _refuse(f"the output head of {type(base).__name__} is {type(head).__name__}, not a plain Linear "
                      "(an adapter on lm_head?): use 'standard' or 'chunked'")


def install(model: torch.nn.Module, kind: str, mode: str) -> None:
    """Make `model` compute its training loss with `mode` inside `computing_loss(model)`. Outside it (evaluation,
    generation) the head makes logits as before. Parameter names and state dicts are unchanged."""
    check_supported(model, kind, mode)
    if mode == "standard":
        return
    base = _base(model)
    head = base.get_output_embeddings()
    # Gemma-2 soft-caps the head's output inside its forward: while the chunked loss is active the model's own
    # soft-capping is switched off (it would cap the hidden states the head passes through) and each slice is capped
    softcap = getattr(getattr(base, "config", None), "final_logit_softcapping", None) if mode == "chunked" else None
    state = {"active": False, "mode": mode, "head": head, "softcap": softcap}
    plain_forward = head.forward

    def forward(self, hidden):  # the loss function gets the hidden states and makes the logits chunk by chunk
        return hidden if state["active"] else plain_forward(hidden)

    head.forward = types.MethodType(forward, head)
    plain_loss = base.loss_function

    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=IGNORE_INDEX,
                      shift_labels=None, **kwargs):
        if not state["active"]:
            return plain_loss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                              ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        return causal_loss(logits, head.weight, head.bias, labels, mode, num_items_in_batch=num_items_in_batch,
                           ignore_index=ignore_index, shift_labels=shift_labels, chunk_loss=state.get("chunk_loss"),
                           project=plain_forward, softcap=state["softcap"])

    base.loss_function = loss_function
    setattr(base, _STATE, state)


@contextlib.contextmanager
def computing_loss(model: torch.nn.Module):
    """While inside, a forward with labels computes the installed chunked / fused loss (no-op for 'standard')."""
    state = getattr(_base(model), _STATE, None)
    if state is None:
        yield
        return
    config = getattr(_base(model), "config", None)
    state["active"] = True
    if state.get("softcap"):
        config.final_logit_softcapping = None
    try:
        yield
    finally:
        state["active"] = False
        if state.get("softcap"):
            config.final_logit_softcapping = state["softcap"]


# --------------------------------------------------------------------------- the loss
def causal_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                mode: str, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                shift_labels: torch.Tensor | None = None, chunk_loss=None, project=None,
                softcap: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy of `hidden` (batch × positions × hidden) through the head (`weight`, `bias`), as
    transformers' ForCausalLMLoss: targets are the labels shifted left by one, `ignore_index` is skipped, the sum
    is divided by `num_items_in_batch` when given, else by the number of counted targets. The chunked loss runs each
    slice through `project` (the head module's own forward, adapters included) when given, and soft-caps its logits
    (`cap · tanh(logits / cap)`, Gemma-2) when `softcap` is set."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.to(hidden.device)
    if mode == "chunked":
        total = _chunked_sum(hidden, weight, bias, targets, ignore_index, chunk_loss or chunk_cross_entropy,
                             project=project, softcap=softcap)
    elif mode == "fused_linear":
        flat = hidden.reshape(-1, hidden.shape[-1])
        chunk = fused_chunk_tokens(flat.shape[0], weight.shape[0], weight.shape[1])
        total = _FusedLinearCrossEntropy.apply(flat, weight, bias, targets.reshape(-1), ignore_index, chunk)
    else:
        raise _refuse(f"unknown cross-entropy {mode!r}")
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / (targets != ignore_index).sum()


def fused_chunk_tokens(tokens: int, vocab: int, hidden: int) -> int:
    """Liger's chunk size: about as many logits per chunk as the hidden states have elements, a power of two."""
    per = max(1, math.ceil(tokens / max(1, math.ceil(vocab / hidden))))
    return 1 << (per - 1).bit_length()


def chunk_cross_entropy(piece: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """One slice's summed cross-entropy, upcast to fp32 first: torchtune's `compute_cross_entropy`, the part of its
    loss a compiled run compiles (`set_chunk_loss`)."""
    return F.cross_entropy(piece.float().reshape(-1, piece.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                           reduction="sum")


def set_chunk_loss(model: torch.nn.Module, fn) -> bool:
    """Use `fn` (e.g. a torch.compile'd `chunk_cross_entropy`) for each slice of the chunked loss; False when the model
    has no chunked loss installed."""
    state = getattr(_base(model), _STATE, None)
    if state is None or state["mode"] != "chunked":
        return False
    state["chunk_loss"] = fn
    return True


def _chunked_sum(hidden, weight, bias, targets, ignore_index, chunk_loss=chunk_cross_entropy, project=None,
                 softcap=None) -> torch.Tensor:
    """torchtune: the head on 8 slices of the sequence (all kept), then each slice upcast and reduced."""
    chunks = hidden.chunk(TORCHTUNE_CHUNKS, dim=1)
    logits = [project(h) if project is not None else F.linear(h, weight, bias) for h in chunks]
    if softcap:
        logits = [torch.tanh(piece / softcap) * softcap for piece in logits]
    total = None
    for piece, target in zip(logits, targets.chunk(TORCHTUNE_CHUNKS, dim=1)):
        part = chunk_loss(piece, target, ignore_index)
        total = part if total is None else total + part
    return total


# A simulation (fake tensors) runs only these of the fused loss's chunks: the first two and the last. Every chunk
# allocates and frees the same tensors around the same preallocated gradients, so the chunks between the second and
# the last repeat the second's memory exactly (live bytes and the allocator's cached blocks alike; tested against the
# whole loop and against real runs) -- while a real vocabulary makes hundreds of chunks per micro-batch (Qwen2.5-0.5B:
# 152k entries on 896 wide is a chunk per 2 tokens), each of them a dozen dispatched operations. Real tensors run all.
SIMULATE_EVERY_CHUNK = False


def _chunk_starts(hidden: torch.Tensor, chunk: int) -> list[int]:
    from torch._subclasses.fake_tensor import is_fake

    starts = list(range(0, hidden.shape[0], chunk))
    if len(starts) > 3 and not SIMULATE_EVERY_CHUNK and is_fake(hidden):
        return [starts[0], starts[1], starts[-1]]
    return starts


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of the cross-entropy of `hidden @ weightᵀ + bias` over the counted targets; gradients computed chunk by
    chunk in forward (the logits of a chunk never outlive it) and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, chunk):
        need_h = hidden.requires_grad
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None  # accumulated in the weight's dtype, as Liger does
        grad_b = torch.zeros_like(bias) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # the head's compute dtype: autocast's under mixed precision (one cast of the weight, as autocast makes),
        # else the hidden states' own
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        for start in _chunk_starts(hidden, chunk):
            h = hidden[start:start + chunk].to(dtype)
            target = targets[start:start + chunk]
            logits = F.linear(h, w, b)
            z = logits.float()
            del logits
            lse = torch.logsumexp(z, dim=-1)
            counted = target != ignore_index
            safe = target.masked_fill(~counted, 0).unsqueeze(1)
            picked = z.gather(1, safe).squeeze(1)
            total = total + ((lse - picked) * counted).sum()
            del picked
            if not (need_h or need_w or need_b):
                continue
            # d(loss)/d(logits) = softmax − one-hot, zero on ignored rows; computed in place in the fp32 chunk
            z.sub_(lse.unsqueeze(1)).exp_()
            z.scatter_add_(1, safe, counted.unsqueeze(1).to(z.dtype).neg())
            z.mul_(counted.unsqueeze(1))
            del lse
            g = z.to(dtype)
            del z
            if need_h:
                grad_h[start:start + chunk] = g @ w
            if need_w:
                grad_w.addmm_(g.t().to(grad_w.dtype), h.to(grad_w.dtype))
            if need_b:
                grad_b.add_(g.sum(0).to(grad_b.dtype))
            del g, h
        del w, b
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        for g in (grad_h, grad_w, grad_b):
            if g is not None:
                g.mul_(grad_total.to(g.dtype))  # in place, as Liger: d(total) is a scalar (1 / counted targets)
        return grad_h, grad_w, grad_b, None, None, None
