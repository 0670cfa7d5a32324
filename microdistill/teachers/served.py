"""Black-box teachers: any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, Ollama, a hosted API).

    microdistill extract --teacher openai:qwen2.5-coder-0.5b-instruct --teacher-url http://127.0.0.1:8011/v1 ...
    MICRODISTILL_API_KEY=... microdistill extract --teacher openai:MODEL --teacher-url https://HOST/v1 ...

Each input is one chat completion of the task's messages (task.messages) at temperature 0,
asking for JSON that matches the task's schema (`response_format` json_schema; a server that
refuses it is asked plainly, and every answer is validated and asked again when invalid) and
for `logprobs` with the TOP_K most likely tokens at every step. The key comes from
MICRODISTILL_API_KEY, else OPENAI_API_KEY; a local server needs none.

Token ids. Shards hold teacher token ids, so the server's log-probabilities become a soft
target only with the server model's own tokenizer: `--teacher-tokenizer` (a preset, model
folder or .gguf), else the preset named like the served model, else the folder the server says
the model came from (vLLM's `root`) when it exists here. It is checked on the first call: the
server's count of prompt tokens must equal the local count of the chat-templated prompt, and
every returned token must be a token of it. Then the top-k log-probabilities are stored as a
sparse soft target over the kept vocabulary (`signal: "logits"`), and each enum field's
decision point is read from the step where its value starts (extract/served.py).

Without it (a model microdistill cannot load, or a server that returns no log-probabilities)
the shards are text-only (`signal: "text"`): sequence-level distillation from the answers,
trained with cross-entropy alone. Their ids come from a stand-in tokenizer, the default
preset's. A heads student needs only the answers' fields: its pretrained encoder brings its own
tokenizer, so the stand-in never matters to it; a decoder student learns to write the answers
in the stand-in's tokens.
"""

from __future__ import annotations

import math
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

from microdistill.core.console import say
from microdistill.core.task import Task
from microdistill.teachers.presets import PRESETS, TeacherError
from microdistill.teachers.teacher import SERVED_PREFIX as PREFIX

KEY_VARS = ("MICRODISTILL_API_KEY", "OPENAI_API_KEY")
TOP_K = 20  # the most OpenAI's own API returns; vLLM serves more with --max-logprobs
ATTEMPTS = 6  # per call, for rate limits, server errors, timeouts and lost connections
JSON_ATTEMPTS = 3  # per input, for answers that are not valid JSON for the task
TIMEOUT_S = 120.0
CONCURRENCY = 8  # calls in flight by default
STAND_IN = "qwen2.5-coder-0.5b-instruct"


@dataclass
class Answer:
    """One input's reply. `steps`: per generated token (id, logprob, {id: logprob} of the top-k,
    the chosen one included), or None without log-probabilities; `fields` is None when the
    answer is unusable, and `problem` says why."""

    text: str
    fields: dict[str, Any] | None
    steps: list[tuple[int, float, dict[int, float]]] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    problem: str = ""


def _tokenizer_from(spec: str):
    """A tokenizer from a preset name, a model folder or a .gguf file (converted folders are cached)."""
    from transformers import AutoTokenizer

    from microdistill.teachers.hf import convert_gguf
    from microdistill.teachers.presets import file_sha256, preset_gguf

    path = Path(spec).expanduser()
    if spec in PRESETS:
        path = convert_gguf(preset_gguf(spec), PRESETS[spec].sha256)
    elif path.is_file() and path.suffix == ".gguf":
        path = convert_gguf(path, file_sha256(path))
    if not path.is_dir():
        raise TeacherError(f"--teacher-tokenizer {spec!r}: not a preset ({', '.join(PRESETS)}), a model folder nor a .gguf file")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise TeacherError(f"tokenizer {path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from None


class ServedTeacher:
    """A served model behind an OpenAI-compatible API; see the module docstring.

    Besides the `Teacher` attributes: `logprobs` (the server returns them), `structured` (it
    takes a json_schema response format), `own_tokenizer` (the tokenizer is the server model's,
    checked by `probe`), `notes` (what was found out, for the manifest and the user).
    """

    def __init__(self, spec: str, url: str | None, tokenizer: str | None = None, timeout_s: float = TIMEOUT_S,
                 progress: bool = True):
        import openai

        from microdistill.teachers.hf import end_of_answer_id, tokenizer_sha256

        if not spec.startswith(PREFIX) or not spec[len(PREFIX):]:
            raise TeacherError(f"teacher {spec!r}: an API teacher is written openai:MODEL")
        if not url:
            raise TeacherError(f"teacher {spec!r} needs --teacher-url, the server's OpenAI base URL (e.g. http://127.0.0.1:8000/v1)")
        self.model, self.url, self.progress = spec[len(PREFIX):], url.rstrip("/"), progress
        self.key_var = next((v for v in KEY_VARS if os.environ.get(v)), None)
        # max_retries=0: the retries below say what happened; a local server takes any key
        self.client = openai.OpenAI(base_url=self.url, api_key=os.environ[self.key_var] if self.key_var else "none",
                                    timeout=timeout_s, max_retries=0)
        self.notes: list[str] = []
        root = self._check_model()
        if tokenizer is None:
            tokenizer = self.model if self.model in PRESETS else root
        self.own_tokenizer = tokenizer is not None
        if tokenizer is None:
            self.notes.append(f"no tokenizer of {self.model!r} to load: text-only shards, tokenised with {STAND_IN}'s")
        self.tokenizer_spec = str(tokenizer or STAND_IN)
        self.tokenizer = _tokenizer_from(self.tokenizer_spec)
        self.eos_id = end_of_answer_id(self.tokenizer)
        self.vocab_size = len(self.tokenizer)
        self.tokenizer_sha256 = tokenizer_sha256(self.tokenizer)
        self.name, self.sha256, self.source = self.model, "", spec
        self.logprobs, self.structured, self.probed = True, True, False
        self._ids: dict[bytes, int] | None = None
        self.access = "black"  # answers and, where the server gives them, top-k log-probabilities
        self.concurrency = CONCURRENCY  # calls in flight when it labels many texts
        self.attempts = ATTEMPTS  # tries per call

    def limit(self, attempts: int | None = None, timeout_s: float | None = None, concurrency: int | None = None) -> None:
        """Ask with fewer tries, a shorter timeout per call or fewer calls in flight (a server behind
        a cascade must give up on a down teacher in seconds, not minutes)."""
        self.attempts = attempts or self.attempts
        self.concurrency = concurrency or self.concurrency
        if timeout_s:
            self.client = self.client.with_options(timeout=timeout_s)

    # ---- the Teacher protocol ---------------------------------------------------------------
    def prompt_text(self, task: Task, text: str) -> str:
        return self.tokenizer.apply_chat_template(task.messages(text), tokenize=False, add_generation_prompt=True)

    def describe(self) -> dict[str, Any]:
        """The manifest's `teacher` entry: what the answers depend on (not the URL: many servers
        of one model may label one folder)."""
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "tokenizer": self.tokenizer_spec,
                "tokenizer_sha256": self.tokenizer_sha256, "vocab_size": self.vocab_size}

    def answers(self, task: Task, texts: list[str]) -> list[Answer]:
        """The Answer of each text, up to `concurrency` calls in flight; the first call of all alone (`probe`)."""
        got: dict[int, Answer] = {}
        todo = list(enumerate(texts))
        if todo and not self.probed:
            got[0] = self.probe(task, todo.pop(0)[1])
        for (i, _), answer in in_flight(self, task, todo, self.concurrency):
            got[i] = answer
        return [got[i] for i in range(len(texts))]

    def labeller(self, task: Task, kept: list[int] | None = None, draft=None):
        """Texts -> answer texts (canonical JSON, or "" for an unusable answer). `kept` and `draft`
        are for the common interface: a served model decodes its whole vocabulary where it runs."""
        return lambda texts: [task.serialize(a.fields) if a.fields is not None else "" for a in self.answers(task, texts)]

    def write(self, conversations: list[list[dict[str, str]]], max_tokens: int, temperature: float, seed: int) -> list[str]:
        """Free text, sampled, for each chat conversation, `concurrency` calls in flight."""
        from concurrent.futures import ThreadPoolExecutor

        ask = lambda k: self._call("write", self.client.chat.completions.create, model=self.model,  # noqa: E731
                                   messages=conversations[k], max_tokens=max_tokens, temperature=temperature,
                                   seed=seed + k, attempts=self.attempts)[0].choices[0].message.content or ""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(ask, range(len(conversations))))

    @property
    def signal(self) -> str:
        return "logits" if self.logprobs and self.own_tokenizer else "text"

    # ---- calls ------------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, attempts: int = ATTEMPTS, **kwargs):
        """fn(*args, **kwargs), again after a rate limit, a server error, a timeout or a lost
        connection (exponential backoff, or the server's Retry-After); returns (result, retries).
        A refused key is a one-line TeacherError; other API errors are the caller's."""
        import openai

        for attempt in range(1, attempts + 1):
            try:
                return fn(*args, **kwargs), attempt - 1
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
                status = getattr(e, "status_code", None)
                why = {429: "rate limit (429)"}.get(status, f"server error ({status})" if status else
                                                    f"no connection ({type(e).__name__})")
                if attempt == attempts:
                    if status is None:
                        raise TeacherError(f"cannot reach the teacher server at {self.url} after {attempts} attempts "
                                           f"({type(e).__name__}); is it running? check --teacher-url") from None
                    raise TeacherError(f"teacher server at {self.url}: {why} on all {attempts} attempts; try later "
                                       "or with a lower --concurrency") from None
                after = getattr(getattr(e, "response", None), "headers", {}).get("retry-after")
                wait = min(float(after), 60.0) if after and after.replace(".", "", 1).isdigit() else min(0.5 * 2 ** (attempt - 1), 30.0)
                say(f"{what}: {why}; retry {attempt}/{attempts - 1} in {wait:.1f} s", True)
                time.sleep(wait)
            except openai.AuthenticationError:
                if self.key_var is None:
                    raise TeacherError(f"teacher server at {self.url} needs an API key: set {' or '.join(KEY_VARS)}") from None
                raise TeacherError(f"teacher server at {self.url} rejected the key in ${self.key_var}") from None
        raise AssertionError("unreachable")

    def _check_model(self) -> str | None:
        """Fail early on a wrong URL, key or model name; returns the model's local folder when the
        server names one that exists here (vLLM's `root`)."""
        import openai

        try:
            models, _ = self._call("teacher", self.client.models.list, attempts=3)
        except openai.APIStatusError:
            return None  # a server without /models: the first call will tell
        served = {m.id: m for m in models.data}
        if self.model not in served:
            raise TeacherError(f"teacher server at {self.url} serves no model {self.model!r}; it serves: "
                               f"{', '.join(sorted(served)) or 'nothing'}")
        root = getattr(served[self.model], "root", None) or (served[self.model].model_extra or {}).get("root")
        return root if root and (Path(root) / "tokenizer_config.json").is_file() else None

    def _request(self, task: Task, text: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.model, "messages": task.messages(text), "temperature": 0.0,
                                  "max_tokens": task.output.max_tokens, "seed": 0}
        if self.logprobs:
            kwargs.update(logprobs=True, top_logprobs=TOP_K)
        if self.structured:
            name = re.sub(r"[^A-Za-z0-9_-]", "_", task.name)
            kwargs["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": name, "schema": task.json_schema(), "strict": True}}
        return kwargs

    def probe(self, task: Task, text: str) -> Answer:
        """The first call, alone: learn what the server takes (json_schema, logprobs) and check
        the tokenizer against the server's own count of prompt tokens. Returns its answer."""
        import openai

        while True:
            try:
                answer = self.ask(task, text)
                break
            except openai.BadRequestError as e:
                if self.structured:
                    self.structured = False
                    self.notes.append(f"the server refused a json_schema response format ({_message(e)}): "
                                      "answers are validated and asked again when invalid")
                elif self.logprobs:
                    self.logprobs = False
                    self.notes.append(f"the server refused logprobs ({_message(e)}): text-only shards")
                else:
                    raise TeacherError(f"teacher server at {self.url} refused the request: {_message(e)}") from None
        if self.logprobs and answer.steps is None and answer.fields is not None:
            self.logprobs = False
            self.notes.append("the server returned no log-probabilities: text-only shards")
        if self.own_tokenizer and self.logprobs:
            local = len(self.tokenizer(self.prompt_text(task, text), add_special_tokens=False).input_ids)
            if answer.prompt_tokens and answer.prompt_tokens != local:
                self.own_tokenizer = False
                self.notes.append(f"the server counts {answer.prompt_tokens} prompt tokens where tokenizer "
                                  f"{self.tokenizer_spec} counts {local}: not the model's tokenizer; text-only shards")
        self.probed = True
        for note in self.notes:
            say(f"note: teacher {self.source}: {note}", self.progress)
        return answer

    def ask(self, task: Task, text: str) -> Answer:
        """One input's answer, asked again (up to JSON_ATTEMPTS) while it is not valid for the task.
        After `probe`, a request the server refuses is this input's problem, not an error."""
        import openai

        retries, problem = 0, ""
        for _ in range(JSON_ATTEMPTS):
            try:
                resp, r = self._call("teacher", self.client.chat.completions.create, attempts=self.attempts,
                                     **self._request(task, text))
            except openai.NotFoundError as e:
                raise TeacherError(f"teacher server at {self.url}: {_message(e)} (are the model name {self.model!r} "
                                   "and the /v1 base URL right?)") from None
            except openai.BadRequestError as e:
                if not self.probed:
                    raise
                return Answer("", None, retries=retries, problem=f"request refused: {_message(e)}")
            retries += r
            choice, usage = resp.choices[0], resp.usage
            content = choice.message.content or ""
            common = {"prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                      "completion_tokens": getattr(usage, "completion_tokens", 0) or 0, "retries": retries}
            if choice.finish_reason == "length":  # cut at max_tokens: the same again next time
                return Answer(content, None, **common, problem=f"cut at {task.output.max_tokens} tokens")
            try:
                fields = task.parse(content)
            except ValueError as e:
                problem = f"not a valid answer ({e}): {content[:60]!r}"
                continue
            steps = self._steps(choice.logprobs) if self.logprobs else None
            return Answer(content, fields, steps, **common)
        return Answer("", None, retries=retries, problem=f"{problem}, {JSON_ATTEMPTS} times")

    # ---- log-probabilities -> token ids -----------------------------------------------------
    def _steps(self, logprobs) -> list[tuple[int, float, dict[int, float]]] | None:
        """Per generated token (id, logprob, top-k {id: logprob}), or None when the server gave no
        log-probabilities or a token that is not one of the tokenizer's."""
        content = getattr(logprobs, "content", None)
        if not content:
            return None
        try:
            steps = []
            for c in content:
                # vLLM spells the -inf of a token its structured-output mask forbids as -9999
                top = {self.token_id(t.token, t.bytes): float(t.logprob) for t in c.top_logprobs or [] if t.logprob > -9000}
                chosen = self.token_id(c.token, c.bytes)
                top[chosen] = float(c.logprob)
                steps.append((chosen, float(c.logprob), top))
            return steps
        except KeyError:
            return None

    def token_id(self, token: str, data: list[int] | None) -> int:
        """The id of a returned token, by its bytes (KeyError for a token the tokenizer lacks)."""
        if self._ids is None:
            from microdistill.data.vocab import token_bytes

            ids: dict[bytes, int] = {}
            for i in range(len(self.tokenizer)):
                ids.setdefault(token_bytes(self.tokenizer, i), i)
            self._ids = ids
        if token.startswith("token_id:"):
            return int(token.split(":", 1)[1])
        return self._ids[bytes(data) if data is not None else token.encode("utf-8")]


def in_flight(teacher: ServedTeacher, task: Task, items: Iterable[tuple[Any, str]], concurrency: int
              ) -> Iterator[tuple[tuple[Any, str], Answer]]:
    """((key, text), answer) as answers arrive, with at most `concurrency` calls in flight (and as
    many queued), so a million-input corpus never becomes a million pending futures."""
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="teacher")
    pending: dict[Any, tuple[Any, str]] = {}
    it = iter(items)
    try:
        while True:
            for item in islice(it, 2 * concurrency - len(pending)):
                pending[pool.submit(teacher.ask, task, item[1])] = item
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                yield pending.pop(f), f.result()
    finally:  # an error (or a consumer that stops): drop the queued calls, let the running ones end
        pool.shutdown(wait=True, cancel_futures=True)


def _message(e: Exception) -> str:
    """The server's own message of an API error, on one line."""
    body = getattr(e, "body", None)
    msg = body.get("message") if isinstance(body, dict) else None
    msg = msg or (body.get("error", {}) or {}).get("message") if isinstance(body, dict) and not msg else msg
    return " ".join(str(msg or e).split())[:200]


def floor_logprob(top: dict[int, float]) -> float:
    """An upper bound on the log-probability of a token outside the top-k: no more than the
    k-th token's, nor than the mass the top-k leave."""
    rest = 1.0 - sum(math.exp(v) for v in top.values())
    return min(min(top.values()), math.log(rest) if rest > 1e-12 else -30.0)


@dataclass
class Usage:
    """What the calls cost, summed over every run on one folder (the manifest's `api_usage`)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    seconds: float = 0.0

    def add(self, a: Answer) -> None:
        self.calls += 1
        self.prompt_tokens += a.prompt_tokens
        self.completion_tokens += a.completion_tokens
        self.retries += a.retries

    def as_dict(self) -> dict[str, Any]:
        n = max(self.calls, 1)
        return {"calls": self.calls, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "retries": self.retries, "seconds": round(self.seconds, 3),
                "prompt_tokens_per_call": round(self.prompt_tokens / n, 2),
                "completion_tokens_per_call": round(self.completion_tokens / n, 2)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Usage":
        d = d or {}
        return cls(int(d.get("calls", 0)), int(d.get("prompt_tokens", 0)), int(d.get("completion_tokens", 0)),
                   int(d.get("retries", 0)), float(d.get("seconds", 0.0)))


__all__ = ["Answer", "ServedTeacher", "Usage", "floor_logprob", "in_flight"]
