"""The HTTP contract of `POST /v1/generate` (and the errors it answers with)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

StopString = Annotated[str, Field(min_length=1, max_length=256)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1, description="A 64-bit integer.")]


class GenerateRequest(BaseModel):
    """Continue `prompt` with the user's production prefix."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, description="The user (or task) whose prefix to use.")
    namespace: str | None = Field(None, min_length=1,
                                  description="Tenant namespace (default: the API key's, else 'default').")
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(32, ge=1, le=1024)
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens (0: all).")
    seed: Seed | None = Field(None, description="Seeds this request's own sampler: the same seed, the same text.")
    stop: list[StopString] = Field(default_factory=list, max_length=4,
                                   description="Generation ends before the first of these strings.")


class GenerateResponse(BaseModel):
    text: str
    user_id: str
    namespace: str
    version: int = Field(description="The prefix version that served the request.")
    sha256: str = Field(description="sha256 of that version's artifact.")
    tokens: int = Field(description="New tokens generated, end-of-sequence included.")
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: end-of-sequence or a stop string; length: max_new_tokens reached.")
    batch_size: int = Field(description="The most rows that shared a decode step with this request.")
    users_in_batch: int = Field(description="Distinct users among the rows of that step.")


class ErrorBody(BaseModel):
    detail: str
