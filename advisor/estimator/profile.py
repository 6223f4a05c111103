"""Calibration profiles (`profiles/calibration/<device>.json`): the per-device terms of the estimator.

A profile holds what only a run on the device can tell: the overhead a device adds to the tensor bytes (CUDA
context, caching-allocator slack), the achieved FLOP/s of each method, and the error band from held-out probes.
`advisor calibrate` writes one for the machine it runs on. Estimates for a GPU use the CUDA profile; estimates
for "no GPU" use the CPU profile. A corrupt profile or one from another format version never breaks estimates:
the shipped profile is used instead, with a warning in the answer's notes.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILE_FORMAT = 1


def calibration_dir() -> Path:
    from advisor.catalog.gpus import profiles_dir

    return profiles_dir() / "calibration"


@dataclass
class Profile:
    id: str
    device_kind: str  # "cuda" | "cpu"
    data: dict[str, Any]
    path: Path | None = None
    notes: list[str] = field(default_factory=list)

    # -- memory -----------------------------------------------------------------------------------
    def overhead_bytes(self, tensor_bytes: float) -> float:
        o = self.data.get("overhead", {})
        return float(o.get("context_bytes", 0)) + float(o.get("allocator_fraction", 0.0)) * tensor_bytes

    def svd_workspace_factor(self) -> float:
        """GaLore on this device: bytes its SVD needs beyond the tensors the simulation counts, per fp32 byte of the
        largest decomposed matrix (CUDA's solver workspace and column-major copies; 0 on CPU)."""
        return float(self.data.get("overhead", {}).get("svd_workspace_factor", 0.0))

    def context_bytes(self) -> float:
        """The device's memory outside the caching allocator (CUDA context, library workspaces)."""
        return float(self.data.get("overhead", {}).get("context_bytes", 0))

    def allocator_replay(self, method: str | None = None) -> dict | None:
        """The measured inputs of an allocator replay (workspace blocks, context bytes, band), None when this profile
        has none or `method` allocates memory the counter cannot see (see advisor.calibration.fit.REPLAY_EXCLUDED)."""
        r = self.data.get("allocator_replay")
        if not isinstance(r, dict):
            return None
        workspaces, context, band = r.get("workspace_bytes"), r.get("context_bytes"), r.get("band")
        ok = (isinstance(workspaces, list) and all(isinstance(w, int) and w >= 0 for w in workspaces)
              and isinstance(context, int) and context >= 0 and isinstance(band, dict)
              and all(isinstance(band.get(k), (int, float)) for k in ("low", "high")))
        if not ok:  # a damaged section: the fitted overhead, which the rest of the profile still gives
            note = f"{self.id}: its allocator_replay section is malformed; exact estimates use the fitted overhead"
            if note not in self.notes:
                self.notes.append(note)
            return None
        excluded = (r.get("evaluation") or {}).get("excluded_methods", ())
        if method is not None and method in excluded:
            return None
        return r

    def overhead_source(self) -> str:
        o = self.data.get("overhead", {})
        return f"{self.id}: {o.get('source', 'no overhead terms')}"

    def _band(self, method: str | None) -> dict:
        own = (self.data.get("band_by_method") or {}).get(method) if method else None
        return own or self.data.get("band", {})

    def band(self, method: str | None = None) -> tuple[float, float]:
        """(low, high) relative error band; a method may have its own (`band_by_method`), else the device's."""
        b = self._band(method)
        return float(b.get("low", -0.02)), float(b.get("high", 0.02))

    def band_source(self, method: str | None = None) -> str:
        return f"{self.id}: {self._band(method).get('source', 'default ±2%')}"

    # -- time ---------------------------------------------------------------------------------------
    def achieved_flops(self, method: str, hardware) -> tuple[float | None, str]:
        t = self.data.get("throughput", {})
        if self.device_kind == "cpu":
            rate = (t.get("achieved_flops") or {}).get(method)
            if rate is None:
                return None, f"{self.id}: no CPU probe of {method} yet (run `advisor calibrate`)"
            return float(rate), f"calibrated:{self.id} (median of CPU probes of {method})"
        gpu = getattr(hardware, "gpu", None)
        if gpu is None:
            return None, "unknown GPU: no peak FLOP/s to scale"
        measured = (t.get("mfu_measured") or {}).get(method)
        peak = gpu.bf16_tflops or gpu.fp16_tflops
        if peak is None:
            return None, f"{gpu.id}: no tensor-core FLOP/s in the catalog"
        if measured is not None:
            return peak * 1e12 * float(measured), f"calibrated:{self.id} (measured MFU of {method})"
        mfu = float(t.get("default_mfu", 0.4))
        return peak * 1e12 * mfu, f"{gpu.id} peak {peak} TFLOPS × default MFU {mfu} ({t.get('default_mfu_source', '')})"

    def launch_floor(self, method: str, gradient_checkpointing: bool, blocks: int) -> tuple[float | None, str]:
        """(the shortest a training step of a `blocks`-block model can take on this device, its source): calibrated
        seconds per block × (blocks + 1), or None where the profile measured none (CPU profiles: compute-bound)."""
        t = self.data.get("throughput", {})
        floor = t.get("launch_floor_s_per_block") or {}
        seconds = floor_seconds(floor, method, gradient_checkpointing, blocks)
        if seconds is None:
            return None, ""
        return seconds, f"launch floor calibrated:{self.id} ({method}, {blocks} blocks)"

    def method_speed_factor(self, method: str) -> float:
        return float((self.data.get("throughput", {}).get("method_speed_factor") or {}).get(method, 1.0))

    def multi_gpu_efficiency(self, strategy: str) -> float:
        return float((self.data.get("multi_gpu_efficiency") or {}).get(strategy, 0.9))


def floor_seconds(floor: dict, method: str, gc: bool, blocks: int) -> float | None:
    """The launch floor of one step (`throughput.launch_floor_s_per_block`, advisor.calibration.fit): seconds per
    block × (blocks + 1); None where the method was not probed (with checkpointing: the floor without it, which a
    checkpointed step exceeds). Here, not beside the fit, so that an estimate does not import pandas."""
    mine = floor.get(method) or {}
    per_block = mine.get("gc" if gc else "no_gc") or (mine.get("no_gc") if gc else None)
    return None if not per_block or not blocks else per_block * (blocks + 1)


class ProfileError(ValueError):
    pass


def read_profile(path: Path) -> Profile:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ProfileError(f"cannot read calibration profile {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{path} is not a calibration profile of format {PROFILE_FORMAT}")
    kind = data.get("device", {}).get("kind")
    if kind not in ("cpu", "cuda"):
        raise ProfileError(f"{path}: device.kind must be 'cpu' or 'cuda'")
    return Profile(data.get("id", Path(path).stem), kind, data, Path(path))


@functools.lru_cache(maxsize=64)
def _load(kind: str, override: str | None, gpu_id: str | None = None) -> Profile:
    shipped = calibration_dir() / f"{kind}-default.json"
    notes = []
    candidates = []
    if override:
        candidates.append(Path(override))
    candidates += _measured_order(list(calibration_dir().glob(f"{kind}-*.json")), gpu_id)
    for path in candidates:
        try:
            profile = read_profile(path)
        except ProfileError as err:
            notes.append(f"{err}; using the shipped profile")
            continue
        if profile.device_kind != kind:
            if path == Path(override or ""):
                notes.append(f"ADVISOR_PROFILE {path} is a {profile.device_kind} profile; a {kind} target needs {kind}")
            continue
        profile.notes = notes
        return profile
    try:
        profile = read_profile(shipped)
    except ProfileError as err:
        notes.append(f"{err}; no calibration terms applied")
        profile = Profile("none", kind, {}, None)
    profile.notes = notes
    return profile


def load_profile(target_kind: str = "cuda", gpu_id: str | None = None) -> Profile:
    """The profile for estimates on `target_kind` hardware ("cuda" for any GPU, "cpu" for none): ADVISOR_PROFILE if
    set, else a measured profile of that GPU (`device.catalog_id == gpu_id`), else the newest measured one, else the
    shipped default."""
    return _load(target_kind, os.environ.get("ADVISOR_PROFILE"), gpu_id)


def profile_for(hardware) -> Profile:
    """The profile for estimates on a resolved hardware target (`advisor.hardware.HardwareTarget`)."""
    return load_profile("cuda" if hardware.has_gpu else "cpu", getattr(hardware.gpu, "id", None))


def _measured_order(paths: list[Path], gpu_id: str | None) -> list[Path]:
    """Measured profiles first (the GPU's own first, then newest first), the shipped default last."""
    def key(path: Path):
        try:
            data = json.loads(path.read_text())
            device = data.get("device", {}) if isinstance(data, dict) else {}
            same = bool(gpu_id) and device.get("catalog_id") == gpu_id
            date = str(data.get("date", "")) if isinstance(data, dict) else ""
        except (OSError, ValueError):
            same, date = False, ""
        return (path.name.endswith("-default.json"), not same, _negated(date), path.name)

    return sorted(paths, key=key)


def _negated(text: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in text)


def clear_cache() -> None:
    _load.cache_clear()
