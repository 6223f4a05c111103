"""Turn the request's `hardware` into a concrete target: memory per device, count, catalog entry."""

from __future__ import annotations

from dataclasses import dataclass

from advisor.catalog.gpus import GPU, resolve_gpu
from advisor.errors import AdvisorInputError
from advisor.schemas import Hardware


@dataclass
class HardwareTarget:
    name: str
    count: int
    memory_gib: float | None  # usable memory per device; None when there is no local GPU
    gpu: GPU | None = None
    local: bool = False

    @property
    def has_gpu(self) -> bool:
        return self.memory_gib is not None

    def to_public(self) -> dict:
        return {"name": self.name, "count": self.count, "usable_memory_gib": self.memory_gib,
                "catalog_id": self.gpu.id if self.gpu else None}


def detect_local() -> HardwareTarget:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        try:
            gpu = resolve_gpu(props.name)
        except AdvisorInputError:
            gpu = None
        total = props.total_memory / 2**30
        return HardwareTarget(props.name, torch.cuda.device_count(), round(total - 0.5, 2), gpu, local=True)
    return HardwareTarget("none (CPU only)", 1, None, None, local=True)


def resolve_hardware(hw: Hardware) -> HardwareTarget:
    if hw.vram_gib is not None and hw.gpu in (None, ""):
        return HardwareTarget(f"{hw.vram_gib:g} GiB GPU", hw.count, float(hw.vram_gib))
    name = (hw.gpu or "").strip()
    if name.lower() == "none":
        if hw.vram_gib is not None:
            raise AdvisorInputError("hardware.vram_gib", "hardware.gpu 'none' means no GPU, so there is no GPU memory "
                                    "to give: drop one of the two")
        return HardwareTarget("none", hw.count, None)
    if name.lower() == "auto":
        target = detect_local()
        target.count = hw.count if hw.count != 1 else target.count
        return target
    gpu = resolve_gpu(name)
    if hw.vram_gib is not None and hw.vram_gib > gpu.memory_gib:  # below it: the memory left to this run
        raise AdvisorInputError("hardware.vram_gib", f"{hw.vram_gib:g} GiB is more than the {gpu.name}'s "
                                f"{gpu.memory_gib:g} GiB; give the memory this run may use (at most the card's), or "
                                "leave it out for the catalog's usable memory")
    memory = float(hw.vram_gib) if hw.vram_gib is not None else float(gpu.usable_memory_gib)
    return HardwareTarget(gpu.name, hw.count, memory, gpu)
