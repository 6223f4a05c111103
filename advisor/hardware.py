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
        return HardwareTarget("none", hw.count, None)
    if name.lower() == "auto":
        target = detect_local()
        target.count = hw.count if hw.count != 1 else target.count
        return target
    gpu = resolve_gpu(name)
    memory = float(hw.vram_gib) if hw.vram_gib is not None else float(gpu.usable_memory_gib)
    return HardwareTarget(gpu.name, hw.count, memory, gpu)
