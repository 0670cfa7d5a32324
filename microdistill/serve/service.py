"""Serving without HTTP: the cascade behind micro-batching workers, with its limits and metrics.

    microdistill serve --student runs/demo/student --teacher qwen2.5-coder-0.5b-instruct --target-agreement 0.97

`Service` is what every route of the HTTP API (app.py) calls. Concurrent callers' texts are
gathered into one student batch (what queued while the last batch ran, plus what arrives within
--batch-window-ms), run on the student's own worker thread; escalated texts go to the teacher's
worker thread, so a slow teacher delays only the calls that wait for it. Each queue is bounded (503 when full); `close` refuses new work and
finishes what is queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable


from microdistill.serve.cascade import Cascade, check_student, teacher_for, threshold_for
from microdistill.serve.config import ServeConfig
from microdistill.serve.answerers import load_answerer
from microdistill.serve.traffic import TrafficLog

log = logging.getLogger("uvicorn.error")


class RequestError(Exception):
    """A request the server refuses: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---- workers ----------------------------------------------------------------------------------------
class MicroBatcher:
    """Runs fn(items) -> results on one worker thread, over items that concurrent callers
    submitted within `window_s` of each other (up to `max_batch`, a larger request alone)."""

    def __init__(self, fn: Callable[[list], list], name: str, max_batch: int, window_s: float, max_queue: int):
        self.fn, self.name, self.max_batch, self.window_s, self.max_queue = fn, name, max_batch, window_s, max_queue
        self.pending = 0  # items queued or running
        self.closing = False
        self.on_batch: Callable[[int], None] = lambda n: None

    async def start(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=self.name)
        self.task = asyncio.create_task(self._run())

    async def submit(self, items: list) -> list:
        if self.closing:
            raise RequestError(503, "the server is shutting down")
        if self.pending + len(items) > self.max_queue:
            raise RequestError(503, f"the {self.name} queue is full ({self.pending} texts waiting); retry shortly")
        future = asyncio.get_running_loop().create_future()
        self.pending += len(items)
        self.queue.put_nowait((items, future))
        return await future

    async def _gather(self, first) -> list:
        batch, n = [first], len(first[0])
        deadline = time.monotonic() + self.window_s
        while n < self.max_batch:
            while n < self.max_batch and not self.queue.empty():
                nxt = self.queue.get_nowait()
                if nxt is None:  # close(): finish this batch, then stop
                    self.queue.put_nowait(None)
                    return batch
                batch.append(nxt)
                n += len(nxt[0])
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(min(left, 0.0005))  # polling, not wait_for(get()): a timed-out get can lose an item
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while (first := await self.queue.get()) is not None:
            batch = await self._gather(first)
            items = [x for chunk, _ in batch for x in chunk]
            self.on_batch(len(items))
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items)
            except Exception as e:  # one failed batch fails its callers, never the worker
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
            else:
                at = 0
                for chunk, future in batch:
                    if not future.done():  # a caller that went away has cancelled its future
                        future.set_result(results[at:at + len(chunk)])
                    at += len(chunk)
            self.pending -= len(items)

    async def close(self) -> None:
        """Refuse new items, finish the queued ones, stop the worker."""
        self.closing = True
        self.queue.put_nowait(None)
        await self.task
        self.executor.shutdown(wait=True)


class Metrics:
    """Prometheus metrics of one service, in their own registry."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("microdistill_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("microdistill_request_seconds", "HTTP request latency by route", ["route"], registry=r,
                                 buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30))
        self.in_flight = Gauge("microdistill_requests_in_flight", "HTTP requests being answered", registry=r)
        self.answers = Counter("microdistill_answers", "texts answered, by who answered", ["answered_by"], registry=r)
        self.escalations = Counter("microdistill_escalations", "texts sent to the teacher", registry=r)
        self.errors = Counter("microdistill_errors", "failures by kind", ["kind"], registry=r)
        self.batch = Histogram("microdistill_student_batch_texts", "texts per student batch", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.ratio = Gauge("microdistill_escalation_ratio", "share of answered texts escalated to the teacher", registry=r)
        self.reloads = Counter("microdistill_student_reloads", "times a new student was loaded in place", registry=r)
        self.traffic = Counter("microdistill_traffic_records", "answered texts --traffic kept, or dropped at its cap",
                               ["outcome"], registry=r)
        self.answers_by = {"student": 0, "teacher": 0, "student-fallback": 0}

    def answered(self, results: list[dict]) -> None:
        for r in results:
            self.answers.labels(r["answered_by"]).inc()
            self.answers_by[r["answered_by"]] += 1
        self.ratio.set(self.answers_by["teacher"] / max(sum(self.answers_by.values()), 1))

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Service:
    """The cascade behind two workers: what every route calls, usable without HTTP."""

    def __init__(self, cascade: Cascade, config: ServeConfig, model_id: str, traffic: TrafficLog | None = None):
        self.cascade, self.config, self.model_id, self.traffic = cascade, config, model_id, traffic
        self.names = config.served_model_name or (model_id,)  # what clients may call it; the first is its id
        self.metrics = Metrics()
        window = config.batch_window_ms / 1000
        self.student = MicroBatcher(cascade.student_answers, "student", config.max_batch, window, config.max_queue)
        self.student.on_batch = self.metrics.batch.observe
        # the teacher takes whatever is queued when it is free: no window, its calls are slow anyway
        self.teacher = MicroBatcher(cascade.teacher_answers, "teacher", config.max_batch, 0.0, config.max_queue)
        self.draining = False
        self.student_dir = getattr(cascade.student, "path", None)
        self.loaded_at = time.time()
        self.in_flight = 0  # HTTP requests being answered (the middleware counts them)
        self.metrics.in_flight.set_function(lambda: self.in_flight)

    async def start(self) -> None:
        await self.student.start()
        await self.teacher.start()

    async def close(self) -> None:
        self.draining = True
        await self.student.close()
        await self.teacher.close()
        if self.traffic is not None:
            self.traffic.close()
        if hasattr(self.cascade.teacher, "close"):
            self.cascade.teacher.close()  # the last teacher answers kept as labels

    def check(self, texts: list[str]) -> None:
        c = self.config
        if len(texts) > c.max_texts:
            raise RequestError(413, f"{len(texts)} texts in one request; the limit is {c.max_texts}")
        for i, t in enumerate(texts):
            if not t.strip():
                raise RequestError(422, f"texts[{i}] is empty")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:  # JSON allows a lone surrogate (\ud800) that no tokenizer reads
                raise RequestError(400, f"texts[{i}] is not valid Unicode (a lone surrogate)") from None
            if len(t) > c.max_text_chars:
                raise RequestError(413, f"texts[{i}] has {len(t):,} characters; the limit is {c.max_text_chars:,}")

    async def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        self.check(texts)
        try:
            results = await self.student.submit(texts)
            todo = [i for i, r in enumerate(results) if self.cascade.escalates(r)]
            if todo:
                self.metrics.escalations.inc(len(todo))
                for i, answer in zip(todo, await self.ask_teacher([texts[i] for i in todo])):
                    results[i] = self.cascade.merge(results[i], answer) if answer else \
                        {**results[i], "answered_by": "student-fallback"}
        except RequestError as e:
            self.metrics.errors.labels("overloaded" if e.status == 503 else "request").inc()
            raise
        except Exception:
            self.metrics.errors.labels("model").inc()
            raise
        self.metrics.errors.labels("invalid_teacher_answer").inc(sum("teacher_error" in r for r in results))
        self.metrics.answered(results)
        if self.traffic is not None:
            kept, dropped = self.traffic.written, self.traffic.dropped
            self.traffic.record(texts, results)
            self.metrics.traffic.labels("kept").inc(self.traffic.written - kept)
            self.metrics.traffic.labels("dropped").inc(self.traffic.dropped - dropped)
        return results

    async def ask_teacher(self, texts: list[str]) -> list[dict[str, Any] | None]:
        """The teacher's answers; when it fails (down, slow past its retries), None for each under
        --on-teacher-error student (the student's answer stands, flagged), else a 503."""
        try:
            return await self.teacher.submit(texts)
        except RequestError:
            raise
        except Exception as e:  # whatever the teacher raised: the policy decides, the log says why
            self.metrics.errors.labels("teacher").inc(len(texts))
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            log.warning("the teacher failed on %d text(s): %s", len(texts), reason)
            if self.config.on_teacher_error == "error":
                raise RequestError(503, f"the teacher is unavailable ({reason})") from None
            return [None] * len(texts)

    async def reload(self) -> bool:
        """Load the student folder again (a new version written in its place) and answer with it
        from the next batch on; batches in flight finish on the old one. A folder that cannot
        be loaded, or does another task, leaves the old student answering (logged)."""
        path = Path(self.student_dir)
        loop = asyncio.get_running_loop()
        try:
            student = await loop.run_in_executor(None, lambda: load_answerer(path, threads=self.config.threads))
            threshold = threshold_for(student, self.config.min_confidence, self.config.target_agreement)
            self.cascade.swap(student, threshold)
        except Exception as e:  # a half-written or wrong folder: keep serving the old student
            log.warning("reload of %s failed, the old student keeps answering: %s", path, str(e).splitlines()[0][:200])
            self.metrics.errors.labels("reload").inc()
            return False
        self.loaded_at = time.time()
        self.metrics.reloads.inc()
        log.info("reloaded the student from %s (threshold %.4g)", path, threshold)
        return True

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` under the student's tokenizer (tokenizers or transformers style)."""
        enc = self.cascade.student.tokenizer.encode(text)
        return len(getattr(enc, "ids", enc))


def build_service(student_dir: Path, config: ServeConfig) -> Service:
    """Load the student (and teacher) and make the service; the model id is the task's name. An
    exported folder (microdistill export) is answered by onnxruntime, without torch."""
    student = load_answerer(Path(student_dir), threads=config.threads)
    check_student(student, f"student folder {student_dir}")
    threshold = threshold_for(student, config.min_confidence, config.target_agreement)
    teacher = teacher_for(config.teacher, student, config.teacher_url, attempts=config.teacher_attempts,
                          timeout_s=config.teacher_timeout_s, concurrency=config.teacher_concurrency) \
        if config.teacher else None
    model_id = config.served_model_name[0] if config.served_model_name else student.task.name
    traffic = TrafficLog(Path(config.traffic), student.task, config.traffic_sample,
                         int(config.traffic_max_mb * 1e6) if config.traffic_max_mb else None) if config.traffic else None
    if traffic is not None and teacher is not None:  # the teacher's answers become labels update reuses
        from microdistill.extract.recording import recorded  # torch: only with a teacher in process

        teacher = recorded(teacher, student, traffic.folder)
    return Service(Cascade(student, threshold, teacher), config, model_id, traffic)
