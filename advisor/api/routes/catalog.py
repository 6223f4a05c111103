"""GET /v1/hardware, /v1/models, /v1/methods, /v1/config: the catalogs, the method registry and the config knobs."""

from fastapi import APIRouter

from advisor.catalog.gpus import gpu_table
from advisor.config import config_reference
from advisor.catalog.models import model_table, resolve_model
from advisor.methods import all_methods, get_method

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/hardware")
def list_hardware() -> list[dict]:
    return gpu_table()


@router.get("/models")
def list_models() -> list[dict]:
    return model_table()


@router.get("/models/{model_id:path}")
def show_model(model_id: str) -> dict:
    return resolve_model(model_id).to_public()


@router.get("/methods")
def list_methods() -> list[dict]:
    return [m.describe() for m in all_methods(extra=True)]


@router.get("/methods/{method_id}")
def show_method(method_id: str) -> dict:
    return get_method(method_id).describe()


@router.get("/config")
def config_knobs() -> dict[str, list[dict]]:
    """Every knob of `config.training` and `config.quantization` (name, type, default, allowed values, limits,
    description); each method's `config.peft` knobs are under /v1/methods."""
    return config_reference()
