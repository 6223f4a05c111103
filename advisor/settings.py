"""Settings in one place: environment variables (prefix ADVISOR_) or a `.env` file."""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADVISOR_", env_file=".env", extra="ignore")

    data_root: Path = Field(Path("./var"), description="The only tree datasets, uploads and job outputs may live in.")
    db_url: str | None = Field(None, description="SQLAlchemy URL; default a SQLite file under the data root.")
    api_token: str | None = Field(None, description="When set, mutating endpoints need 'Authorization: Bearer <token>'.")
    profile: Path | None = Field(None, description="Calibration profile to use instead of the best match for the device.")
    cache_dir_override: Path | None = Field(None, alias="ADVISOR_CACHE_DIR")
    fit_cache_dir_override: Path | None = Field(
        None, alias="ADVISOR_FIT_CACHE_DIR",
        description="Where fitted memory models are kept (default <cache>/coefficients). A fit is named by a hash of "
                    "everything it depends on, so machines and users can share one directory.")
    auto_resume: bool = Field(False, description="Resume jobs found interrupted at startup without being asked.")
    max_upload_mb: float = Field(512, gt=0, description="Largest dataset upload accepted by POST /v1/datasets (MiB).")
    warm_worker: bool = Field(True, description="Start job workers from a warm fork server (torch already imported); "
                              "false starts each worker with a fresh interpreter.")
    warm_simulator: bool = Field(True, description="Fork the exact estimator's simulations from a warm fork server "
                                 "(torch already imported); false starts each with a fresh interpreter.")
    fit_workers: int = Field(1, ge=1, le=64, description="Processes a recommendation runs its candidates' fits in at "
                             "once (1: one after another, in process). On 2 CPUs, 2 workers gained 4-17% "
                             "(bench.parallel_fits): the two CPUs ran CPU-bound Python at ~1.4× one.")
    worker_stop_grace_s: float = Field(30.0, gt=0, description="Seconds a worker told to stop (cancel, server gone) "
                                       "waits for the trainer's checkpoint before it records the job and exits hard.")
    host: str = "127.0.0.1"
    port: int = 8000

    @property
    def cache_dir(self) -> Path:
        return (self.cache_dir_override or self.data_root / "cache").resolve()

    @property
    def fit_cache_dir(self) -> Path:
        return (self.fit_cache_dir_override or self.cache_dir / "coefficients").resolve()

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_root / 'advisor.db').resolve()}"


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
