"""What travels over HTTP: the request bodies the server accepts and the errors it answers with.

    microdistill serve --student runs/demo/student

POST /v1/predict takes {"texts": [...]}; POST /v1/chat/completions takes OpenAI's chat shape
(the last user message is the input). Every error is JSON in OpenAI's shape,
{"error": {"message", "type", "code"}}. app.py routes requests to these and back.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from microdistill.serve.service import RequestError


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[str] = Field(min_length=1)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # sampling options (temperature, ...) are accepted and have no effect
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    n: int = 1
    response_format: dict[str, Any] | None = None


def error_body(status: int, message: str) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def parse_json(raw: bytes, content_type: str, model: type[BaseModel]):
    """The request body as `model`, or a RequestError: 415 not JSON, 400 malformed, 422 invalid."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, f"content type {content_type or 'none'!r}: send application/json")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError(400, "the body's JSON is nested too deeply") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:5])
        raise RequestError(422, f"invalid request: {where}") from None


def last_user_text(request: ChatRequest) -> str:
    for m in reversed(request.messages):
        if m.role == "user":
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
            if not content.strip():
                raise RequestError(422, "messages: the last user message is empty")
            return content
    raise RequestError(422, "messages: no user message to answer")


def check_response_format(fmt: dict[str, Any] | None, task) -> None:
    """A response_format the student's answer satisfies (text, json_object, or a json_schema with
    the task's fields and, where it lists them, the task's values), else a 400 that says why."""
    if fmt is None or fmt.get("type") in ("text", "json_object"):
        return
    if fmt.get("type") != "json_schema":
        raise RequestError(400, f"response_format type {fmt.get('type')!r}: expected text, json_object or json_schema")
    asked = ((fmt.get("json_schema") or {}).get("schema") or {}).get("properties") or {}
    mine = task.json_schema()["properties"]
    if set(asked) != set(mine):
        raise RequestError(400, f"response_format: its schema asks for the fields {sorted(asked)}; this student "
                                f"answers {sorted(mine)}")
    for name, prop in asked.items():
        if "enum" in prop and "enum" in mine[name] and set(prop["enum"]) != set(mine[name]["enum"]):
            raise RequestError(400, f"response_format: field {name!r} asks for the values {prop['enum']}; this "
                                    f"student answers {mine[name]['enum']}")


def completion(model: str, content: str, usage: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completion whose one choice is `content`."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                         "finish_reason": "stop", "logprobs": None}],
            "usage": usage, "microdistill": extra}


def completion_events(model: str, content: str, usage: dict[str, int], extra: dict[str, Any]) -> list[str]:
    """The same answer as server-sent events, as OpenAI streams it: one chunk with the whole
    content, one that says it stopped, then [DONE]."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": content},
                                    "finish_reason": None, "logprobs": None}]},
              {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}],
               "usage": usage, "microdistill": extra}]
    return [f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
