"""Checkpoints: ``output_dir/checkpoint-<step>/`` with everything a resume needs to continue exactly.

    trainable.safetensors   the trainable tensors by parameter name (the whole model for full / GaLore)
    optimizer.pt            optimizer state (GaLore's projectors included)
    scheduler.pt            learning-rate scheduler state
    rng_state_<rank>.pt     Python, NumPy, torch CPU and CUDA generator states of each process
    method_state.pt         state a method keeps outside parameters and optimizer (AdaLoRA's importance scores)
    trainer_state.json      step, epoch, data position, micro-batch/accumulation, losses so far

The directory is written under a temporary name and renamed, so a kill mid-save never leaves a half checkpoint
that resume would pick.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def method_state(prepared) -> dict | None:
    """AdaLoRA keeps importance scores and the rank pattern outside parameters and optimizer."""
    if prepared.method != "adalora":
        return None
    base = prepared.model.base_model
    alloc = getattr(base, "rankallocator", None)
    cfg = base.peft_config[base.trainable_adapter_name]
    return {
        "ipt": getattr(alloc, "ipt", {}),
        "exp_avg_ipt": getattr(alloc, "exp_avg_ipt", {}),
        "exp_avg_unc": getattr(alloc, "exp_avg_unc", {}),
        "rank_pattern": cfg.rank_pattern,
    }


def set_method_state(prepared, state: dict | None) -> None:
    if not state or prepared.method != "adalora":
        return
    base = prepared.model.base_model
    alloc = base.rankallocator
    alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
    base.peft_config[base.trainable_adapter_name].rank_pattern = state["rank_pattern"]


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    prepared,
    trainer_state: dict,
    keep: int,
) -> Path:
    from safetensors.torch import save_file

    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng_state_0.pt")
    ms = method_state(prepared)
    if ms is not None:
        torch.save(ms, tmp / "method_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    prune(output_dir, keep)
    return final


def save_rank_rng(checkpoint: Path, rank: int) -> None:
    torch.save(rng_state(), Path(checkpoint) / f"rng_state_{rank}.pt")


def prune(output_dir: Path, keep: int) -> None:
    found = list_checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


def load_checkpoint(checkpoint: Path, *, model, optimizer, scheduler, prepared, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and method state; returns trainer_state (RNG is restored separately,
    right before the loop, with `restore_rng`)."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    tensors = load_file(str(checkpoint / "trainable.safetensors"))
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{checkpoint}: weights do not belong to this model (e.g. {result.unexpected_keys[:3]})")
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
    if (checkpoint / "method_state.pt").is_file():
        set_method_state(prepared, torch.load(checkpoint / "method_state.pt", map_location="cpu", weights_only=False))
    return read_trainer_state(checkpoint)


def restore_rng(checkpoint: Path, rank: int = 0) -> None:
    path = Path(checkpoint) / f"rng_state_{rank}.pt"
    if not path.is_file():
        path = Path(checkpoint) / "rng_state_0.pt"
    set_rng_state(torch.load(path, weights_only=False))
