"""The HTTP API over a `Service` (service.py), OpenAI-compatible, run under uvicorn.

    microdistill serve --student runs/demo/student --teacher qwen2.5-coder-0.5b-instruct --target-agreement 0.97

Routes: POST /v1/predict {"texts": [...]} -> per text {fields, output, confidence, answered_by};
POST /v1/chat/completions (OpenAI's shape: the last user message is the input, the reply's
content the JSON object); GET /v1/models, /health, /metrics (Prometheus text). Request bodies and
error bodies are protocol.py's. Token counts in `usage` are the student's tokenizer's
([CLS]/[SEP] included), whoever answered: the only tokenizer a student folder is sure to have.
On SIGTERM uvicorn stops accepting connections and lets in-flight requests finish (up to
drain_timeout_s); then the service drains its queues and the process ends.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from microdistill.serve.protocol import (ChatRequest, PredictRequest, check_response_format, completion,
                                         completion_events, error_body, last_user_text, parse_json)
from microdistill.serve.config import ServeConfig
from microdistill.serve.service import RequestError, Service, build_service

log = logging.getLogger("uvicorn.error")
ROUTES = {"/v1/predict", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}  # the rest count as "other"


def make_app(service: Service):
    """The FastAPI app: routes translate HTTP to `service` calls and back, nothing more."""
    app = FastAPI(title="microdistill", lifespan=lifespan(service), docs_url=None, redoc_url=None, openapi_url=None)
    add_observer(app, service)
    add_error_handlers(app)
    add_answer_routes(app, service)
    add_status_routes(app, service)
    return app


def lifespan(service: Service):
    """Start the service with the app; on shutdown, once uvicorn has let in-flight requests finish,
    drain what is queued."""
    @asynccontextmanager
    async def run(app):
        await service.start()
        c = service.config
        log.info("serving %s: the student answers when every field's confidence is >= %.4g; teacher: %s",
                 service.model_id, service.cascade.threshold, c.teacher or "none (the student answers everything)")
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(service.reload()))
        watcher = asyncio.ensure_future(watch(service)) if c.watch_s else None
        yield
        if watcher is not None:
            watcher.cancel()
        loop.remove_signal_handler(signal.SIGHUP)
        await service.close()

    return run


def written_at(folder: Path) -> float:
    """When a student or export folder was last saved: its config.json or export.json, written last."""
    return max((p.stat().st_mtime for p in (folder / "config.json", folder / "export.json") if p.is_file()), default=0.0)


async def watch(service: Service) -> None:
    """Reload the student whenever its folder is saved again (--watch-s)."""
    seen = written_at(Path(service.student_dir))
    while True:
        await asyncio.sleep(service.config.watch_s)
        now = written_at(Path(service.student_dir))
        if now != seen:
            seen = now
            await service.reload()


def add_observer(app: FastAPI, service: Service) -> None:
    """Every request: refused early when its declared body is too large, timed and counted per
    route and status, and a bug answered as one JSON 500 with the trace in the log."""
    m = service.metrics

    @app.middleware("http")
    async def observe(request: Request, call_next):
        route = request.url.path if request.url.path in ROUTES else "other"
        api = route.startswith("/v1/")  # in flight: calls being answered, not scrapes of /metrics or /health
        service.in_flight += api
        t0 = time.perf_counter()
        try:
            length = int(request.headers.get("content-length") or 0)
            if length > service.config.max_body_bytes:
                response = JSONResponse(error_body(413, f"the body has {length:,} bytes; the limit is "
                                                        f"{service.config.max_body_bytes:,}"), 413)
            else:
                response = await call_next(request)
        except Exception as e:  # a bug, not a request error: one JSON line for the client, the trace in the log
            log.exception("request failed")
            response = JSONResponse(error_body(500, f"internal error ({type(e).__name__})"), 500)
        finally:
            service.in_flight -= api
        m.latency.labels(route).observe(time.perf_counter() - t0)
        m.requests.labels(route, str(response.status_code)).inc()
        return response


def add_error_handlers(app: FastAPI) -> None:
    """Request errors and HTTP errors (unknown route, wrong method) as JSON in OpenAI's shape."""
    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        if e.status == 499:
            log.info("%s %s: %s", request.method, request.url.path, e)
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(error_body(e.status, str(e)), e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(error_body(e.status_code, str(e.detail)), e.status_code)


def add_answer_routes(app: FastAPI, service: Service) -> None:
    """POST /v1/predict and /v1/chat/completions: the calls the student (or the teacher) answers."""
    async def body(request: Request, model: type[BaseModel]):
        try:
            raw = await request.body()
        except ClientDisconnect:  # the client's doing: one log line, not a server error
            raise RequestError(499, "the client closed the connection before sending its whole body") from None
        if len(raw) > service.config.max_body_bytes:  # a body sent without a content length
            raise RequestError(413, f"the body is over {service.config.max_body_bytes:,} bytes")
        return parse_json(raw, request.headers.get("content-type", ""), model)

    @app.post("/v1/predict")
    async def predict(request: Request):
        req = await body(request, PredictRequest)
        results = await service.predict(req.texts)
        return {"model": service.model_id, "results": results}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await body(request, ChatRequest)
        if req.model not in service.names:
            raise RequestError(404, f"model {req.model!r} not found; this server serves "
                                    f"{', '.join(map(repr, service.names))}")
        if req.n != 1:
            raise RequestError(400, "n > 1 is not supported: each call has one JSON answer")
        check_response_format(req.response_format, service.cascade.task)
        text = last_user_text(req)
        r = (await service.predict([text]))[0]
        prompt, completion_tokens = service.count_tokens(text), service.count_tokens(r["output"])
        usage = {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}
        extra = {k: r[k] for k in ("fields", "confidence", "answered_by")}
        if req.stream:
            return StreamingResponse(iter(completion_events(req.model, r["output"], usage, extra)),
                                     media_type="text/event-stream")
        return completion(req.model, r["output"], usage, extra)


def add_status_routes(app: FastAPI, service: Service) -> None:
    """GET /v1/models, /health and /metrics: what is served and how it is doing."""
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(service.loaded_at),
                                            "owned_by": "microdistill", "root": str(service.student_dir)}
                                           for name in service.names]}

    @app.get("/health")
    async def health():
        status = 503 if service.draining else 200
        return JSONResponse({"status": "draining" if service.draining else "ok", "model": service.model_id,
                             "teacher": service.cascade.teacher is not None, "threshold": service.cascade.threshold,
                             "calibrated": bool(getattr(service.cascade.student, "temperatures", None)),
                             "student": str(service.student_dir), "loaded_at": service.loaded_at}, status)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)


def run_server(student_dir: Path, config: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM; then finish in-flight requests (up to drain_timeout_s) and exit."""
    import uvicorn

    service = build_service(Path(student_dir), config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                log.info("shutting down: draining %d in-flight request(s)", service.in_flight)
                service.draining = True
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # a clean drain is a clean exit (status 0), not death by the signal
                self._captured_signals.remove(sig)

    Server(uvicorn.Config(make_app(service), host=config.host, port=config.port, access_log=False,
                          timeout_graceful_shutdown=config.drain_timeout_s, log_level="info")).run()
