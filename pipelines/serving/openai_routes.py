"""OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions` (non-streaming
and server-sent events) and `GET /v1/models`. A user's prefix is the model: `model` is
"namespace/user" (split at the first "/": namespaces hold none, user ids may) or a bare "user"
in the default namespace."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from sse_starlette import EventSourceResponse

from prefixfleet.pipelines.serving.engine import Finished, RowSettings
from prefixfleet.pipelines.serving.keys import Caller, current_caller
from prefixfleet.pipelines.serving.openai_schemas import ChatRequest, CompletionRequest
from prefixfleet.pipelines.serving.service import BadRequest, Choices, PrefixService
from prefixfleet.registry import InvalidUserKey, NotFound, UserKey
from prefixfleet.workers.sampling import Sampling


class NoChatTemplate(BadRequest):
    """The backbone's tokenizer has no chat template."""


def model_key(model: str, caller: Caller) -> UserKey:
    """The user a `model` names ("namespace/user", or a bare user in the caller's namespace); an
    impossible name is as unknown as a missing user, and so is another tenant's user."""
    namespace, _, user = model.partition("/") if "/" in model else (None, "", model)
    try:
        return caller.user(namespace, user)
    except InvalidUserKey:
        raise NotFound(f"the model {model!r} does not exist") from None


def model_id(key: UserKey) -> str:
    return f"{key.namespace}/{key.user_id}"


def _settings(request: CompletionRequest | ChatRequest, max_new_tokens: int) -> RowSettings:
    greedy = request.temperature == 0
    sampling = Sampling(not greedy, request.temperature if not greedy else 1.0, request.top_k, request.top_p)
    return RowSettings(max_new_tokens, sampling, request.seed, request.stops)


def _usage(choices: Choices, done: list[Finished]) -> dict[str, int]:
    completion = sum(len(d.token_ids) for d in done)
    return {"prompt_tokens": choices.prompt_tokens, "completion_tokens": completion,
            "total_tokens": choices.prompt_tokens + completion}


def _fingerprint(choices: Choices) -> str:
    ref = choices.prefix.ref
    return f"prefix-v{ref.version}-{ref.sha256[:12]}"


def add_openai_routes(app: FastAPI, service: PrefixService) -> None:
    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, who: Annotated[Caller, Depends(current_caller)],
                          http: Request) -> Any:
        """Continue each prompt with the user's production prefix (OpenAI's legacy completions)."""
        choices = await service.submit(model_key(request.model, who), request.prompts,
                                       _settings(request, request.max_tokens), request.n)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": request.model, "system_fingerprint": _fingerprint(choices)}
        if request.stream:
            def chunk(index: int, text: str, reason: str | None) -> dict[str, Any]:
                return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
            return _stream(choices, head, chunk, request.include_usage, service.config.request_timeout_s)
        done = await service.finished(choices, partial(disconnected, http))
        return head | {"choices": [{"index": i, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason}
                                   for i, d in enumerate(done)], "usage": _usage(choices, done)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, who: Annotated[Caller, Depends(current_caller)],
                               http: Request) -> Any:
        """Answer the conversation with the user's production prefix, through the tokenizer's chat
        template (400 when the backbone has none)."""
        key = model_key(request.model, who)
        prompt = _chat_prompt(service, request)
        wanted = request.wanted_tokens
        choices = await service.submit(key, [prompt], _settings(request, wanted or service.config.max_new_tokens),
                                       request.n, fit_context=wanted is None)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": request.model, "system_fingerprint": _fingerprint(choices)}
        if request.stream:
            def chunk(index: int, text: str | None, reason: str | None) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            return _stream(choices, head | {"object": "chat.completion.chunk"}, chunk, request.include_usage,
                           service.config.request_timeout_s, opens_with_role=True)
        done = await service.finished(choices, partial(disconnected, http))
        return head | {"choices": [{"index": i, "message": {"role": "assistant", "content": d.text},
                                    "logprobs": None, "finish_reason": d.finish_reason} for i, d in enumerate(done)],
                       "usage": _usage(choices, done)}

    @app.get("/v1/models")
    def models(who: Annotated[Caller, Depends(current_caller)],
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
               ) -> dict[str, Any]:
        """The caller's users with a production prefix, a page at a time (`after`: the last id of
        the page before)."""
        page, more = service.list_models(limit, model_key(after, who) if after else None, who.namespace)
        data = [{"id": model_id(key), "object": "model", "created": 0, "owned_by": key.namespace} for key in page]
        return {"object": "list", "data": data, "has_more": more}


def _chat_prompt(service: PrefixService, request: ChatRequest) -> str:
    tokenizer = service.backbone.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate(f"the backbone {service.backbone.name_or_path} has no chat template; "
                             "use /v1/completions with a plain prompt")
    messages = [m.as_template_input() for m in request.messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


async def disconnected(request: Request) -> None:
    """Returns once the client has gone away (its request body is read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _stream(choices: Choices, head: dict[str, Any], chunk: Callable[..., dict[str, Any]], include_usage: bool,
            timeout_s: float, *, opens_with_role: bool = False) -> EventSourceResponse:
    """Server-sent events: one chunk per piece of text per choice, a closing chunk per choice with
    its finish_reason, the usage when asked, then [DONE]. A client that goes away cancels its rows;
    a stream past the request timeout ends with an error event."""

    async def events() -> AsyncIterator[dict[str, str]]:
        def event(body: dict[str, Any]) -> dict[str, str]:
            return {"data": json.dumps(head | body)}

        if opens_with_role:  # chat: each choice opens with the assistant's role
            for index in range(len(choices.rows)):
                yield event({"choices": [chunk(index, None, None)]})
        done: list[Finished] = []
        try:
            async with asyncio.timeout(timeout_s):
                async for index, item in choices.events():
                    if isinstance(item, str):
                        yield event({"choices": [chunk(index, item, None)]})
                    else:
                        done.append(item)
                        yield event({"choices": [chunk(index, "", item.finish_reason)]})
        except TimeoutError:
            choices.cancel()
            yield {"data": json.dumps({"error": {"message": f"the request did not finish within {timeout_s:g} s",
                                                 "type": "timeout"}})}
            return
        except Exception as exc:  # noqa: BLE001 - the stream has begun: say so in it, then end
            yield {"data": json.dumps({"error": {"message": " ".join(str(exc).split()), "type": "server_error"}})}
            return
        if include_usage:
            yield event({"choices": [], "usage": _usage(choices, done)})
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15)
