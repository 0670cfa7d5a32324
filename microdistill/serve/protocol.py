"""What travels over HTTP: the request bodies the server accepts and the errors it answers with.

    microdistill serve --student runs/demo/student

POST /v1/predict takes {"texts": [...]}; POST /v1/chat/completions takes OpenAI's chat shape
(the last user message is the input). Every error is JSON in OpenAI's shape,
{"error": {"message", "type", "code"}}. app.py routes requests to these and back.
"""

from __future__ import annotations

import json
from typing import Literal

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
