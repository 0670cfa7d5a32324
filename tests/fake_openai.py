"""A tiny OpenAI-compatible chat server that misbehaves on purpose, for tests/test_api_teacher.py.

    python tests/fake_openai.py --port 8123 --tokenizer TOKENIZER_DIR [--delay-s 2]

A real HTTP server (FastAPI under uvicorn, in its own process) answering the reddit-comment
task by the synthetic rule (synthetic.label), spelled in the tiny tokenizer's tokens with
log-probabilities as vLLM returns them (bytes, top-k, the end-of-turn token last) and the
prompt tokens counted by that tokenizer's chat template. The model name picks a behaviour:

    tiny            answers well
    tiny-429        rate-limits (429, Retry-After) the first 2 calls for each input
    tiny-500        fails (503) the first call for each input
    tiny-badjson    answers the first call for each input with text that is not JSON
    tiny-alwaysbad  never answers with JSON
    tiny-nologprobs returns no log-probabilities
    tiny-noschema   refuses a json_schema response format (400)

Each model's `root` in /v1/models is the tokenizer folder, as vLLM names the folder it serves,
except tiny-nologprobs'. Routes under /auth/v1 need `Authorization: Bearer secret`. GET /stats counts calls per model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import label  # noqa: E402

MODELS = ["tiny", "tiny-429", "tiny-500", "tiny-badjson", "tiny-alwaysbad", "tiny-nologprobs", "tiny-noschema"]
KEY = "secret"


def make_app(tokenizer_dir: str, delay_s: float = 0.0) -> FastAPI:
    from transformers import AutoTokenizer

    from microdistill.data.vocab import token_bytes

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    others = tok("neutral negative", add_special_tokens=False).input_ids[:2]  # alternatives in every top-k
    app = FastAPI()
    calls: Counter = Counter()
    per_input: Counter = Counter()

    def entry(i: int, logprob: float) -> dict:
        data = token_bytes(tok, i)
        return {"token": data.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(data)}

    def logprobs(ids: list[int]) -> dict:
        content = []
        for i in ids:
            top = [entry(i, -0.05)] + [entry(o, -3.0 - k) for k, o in enumerate(others) if o != i]
            content.append({**entry(i, -0.05), "top_logprobs": top})
        return {"content": content}

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "error", "code": status}}, status, headers=headers)

    @app.get("/stats")
    def stats() -> dict:
        return {"calls": dict(calls)}

    def authorised(request: Request) -> bool:
        return not request.url.path.startswith("/auth/") or request.headers.get("authorization") == f"Bearer {KEY}"

    @app.get("/v1/models")
    @app.get("/auth/v1/models")
    def models(request: Request):
        if not authorised(request):
            return error(401, "invalid api key")
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "test",
                                            **({"root": tokenizer_dir} if m != "tiny-nologprobs" else {})} for m in MODELS]}

    @app.post("/v1/chat/completions")
    @app.post("/auth/v1/chat/completions")
    async def chat(request: Request):
        if not authorised(request):
            return error(401, "invalid api key")
        body = await request.json()
        model, messages = body["model"], body["messages"]
        if model not in MODELS:
            return error(404, f"The model `{model}` does not exist.")
        calls[model] += 1
        if delay_s:
            await asyncio.sleep(delay_s)  # a slow teacher (--delay-s)
        text = messages[-1]["content"].removeprefix("Comment: ")
        per_input[model, text] += 1
        n = per_input[model, text]
        if model == "tiny-429" and n <= 2:
            return error(429, "rate limit reached", {"retry-after": "0.05"})
        if model == "tiny-500" and n == 1:
            return error(503, "overloaded")
        if model == "tiny-noschema" and "response_format" in body:
            return error(400, "response_format json_schema is not supported")
        answer = json.dumps(label(text), separators=(",", ":"))
        if model == "tiny-alwaysbad" or (model == "tiny-badjson" and n == 1):
            answer = "Sure! The comment is fine."
        ids = tok(answer, add_special_tokens=False).input_ids + [eos]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        usage = {"prompt_tokens": len(tok(prompt, add_special_tokens=False).input_ids), "completion_tokens": len(ids)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        wants = body.get("logprobs") and model != "tiny-nologprobs"
        choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop",
                  "logprobs": logprobs(ids) if wants else None}
        return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
                "choices": [choice], "usage": usage}

    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--delay-s", type=float, default=0.0, help="wait this long before every answer: a slow teacher")
    args = ap.parse_args()
    uvicorn.run(make_app(args.tokenizer, args.delay_s), host="127.0.0.1", port=args.port, log_level="warning")
