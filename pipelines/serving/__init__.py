"""Mixed-prefix serving: a tiered prefix cache, a continuous-batching engine whose decode steps
carry rows of many users at once, and the HTTP front (in-process FastAPI + uvicorn, or a Ray Serve
deployment in pipelines.serving.ray_app)."""
from prefixfleet.pipelines.serving.cache import PrefixCache, ServedPrefix
from prefixfleet.pipelines.serving.engine import Cancelled, Engine, Finished, RowSettings
from prefixfleet.pipelines.serving.http import InProcessServer, create_app
from prefixfleet.pipelines.serving.schemas import GenerateRequest, GenerateResponse
from prefixfleet.pipelines.serving.service import BadRequest, PrefixService, ServeConfig

__all__ = [
    "BadRequest", "Cancelled", "Engine", "Finished", "GenerateRequest", "GenerateResponse", "InProcessServer",
    "PrefixCache", "PrefixService", "RowSettings", "ServeConfig", "ServedPrefix", "create_app",
]
