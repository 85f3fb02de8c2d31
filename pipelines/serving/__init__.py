"""Mixed-prefix serving: a tiered prefix cache, a batcher that puts different users' requests into
one forward pass, and the HTTP front (in-process FastAPI + uvicorn, or a Ray Serve deployment in
pipelines.serving.ray_app)."""
from prefixfleet.pipelines.serving.batcher import Batcher, GenerationParams
from prefixfleet.pipelines.serving.cache import PrefixCache, ServedPrefix
from prefixfleet.pipelines.serving.http import InProcessServer, create_app
from prefixfleet.pipelines.serving.schemas import GenerateRequest, GenerateResponse
from prefixfleet.pipelines.serving.service import BadRequest, PrefixService, ServeConfig

__all__ = [
    "BadRequest", "Batcher", "GenerateRequest", "GenerateResponse", "GenerationParams", "InProcessServer",
    "PrefixCache", "PrefixService", "ServeConfig", "ServedPrefix", "create_app",
]
