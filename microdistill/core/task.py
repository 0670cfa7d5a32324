"""Tasks: what the teacher is asked, what a valid answer looks like, which inputs qualify.

    microdistill extract --task reddit-comment ...      # a built-in preset
    microdistill extract --task my_task.yaml ...        # your own YAML file

A task is a YAML file validated by the `Task` model below. Unknown keys are errors, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from microdistill.core.errors import UserError


class TaskError(UserError, ValueError):
    """A task name, file or value that cannot be used; the message is one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnumField(_Strict):
    name: str
    type: Literal["enum"] = "enum"
    values: list[str] = Field(min_length=2)
    description: str = ""

    @field_validator("values")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("enum values must be distinct")
        return v


class StringField(_Strict):
    name: str
    type: Literal["string"]
    max_length: int = Field(default=40, ge=1, le=200)
    description: str = ""


class NumberField(_Strict):
    name: str
    type: Literal["number", "integer"]
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""


def _field_kind(v: Any) -> str:
    kind = v.get("type", "enum") if isinstance(v, dict) else v.type
    return "number" if kind == "integer" else kind


OutputField = Annotated[
    Union[
        Annotated[EnumField, Tag("enum")],
        Annotated[StringField, Tag("string")],
        Annotated[NumberField, Tag("number")],
    ],
    Discriminator(_field_kind),
]


class FewShot(_Strict):
    input: str
    output: dict[str, Any]


class Prompt(_Strict):
    system: str
    user: str = "{text}"
    examples: list[FewShot] = []

    @field_validator("user")
    @classmethod
    def _has_text(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("the user template must contain {text}")
        other = sorted(set(re.findall(r"\{(\w+)\}", v)) - {"text"})
        if other:  # sent to the teacher literally otherwise: a typo the user would never see
            raise ValueError(f"the user template has placeholder(s) {', '.join('{' + o + '}' for o in other)}; "
                             "only {text} is filled in")
        return v


class Output(_Strict):
    fields: list[OutputField] = Field(min_length=1)
    # None: compact `{"a":"x","b":"y"}`; an int: json.dumps indent (longer outputs, rarely useful).
    indent: int | None = None
    max_tokens: int = Field(default=50, ge=4, le=512)

    @field_validator("fields")
    @classmethod
    def _unique_names(cls, v: list) -> list:
        names = [f.name for f in v]
        if len(set(names)) != len(names):
            raise ValueError("field names must be distinct")
        return v


class Inputs(_Strict):
    min_tokens: int = Field(default=3, ge=1)
    max_tokens: int = Field(default=25, ge=1, le=512)
    reject: list[str] = []
    strip: list[str] = []
    dedupe: bool = True

    @field_validator("reject", "strip")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"bad regular expression {pattern!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _range(self) -> "Inputs":
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self


class Task(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    prompt: Prompt
    output: Output
    inputs: Inputs = Inputs()

    @model_validator(mode="after")
    def _examples_valid(self) -> "Task":
        for i, ex in enumerate(self.prompt.examples):
            try:
                # in canonical order, so the prompt and the fingerprint do not depend on how the
                # YAML listed the keys (set while validating, before anyone can see the frozen model)
                object.__setattr__(ex, "output", self.validate_fields(ex.output))
            except ValueError as e:
                raise ValueError(f"prompt.examples.{i}.output: {e}") from None
        return self

    # ---- schema -------------------------------------------------------------------------
    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.output.fields]

    @property
    def enum_fields(self) -> list[EnumField]:
        return [f for f in self.output.fields if isinstance(f, EnumField)]

    def json_schema(self) -> dict:
        """JSON Schema of a valid output; property order is the canonical field order."""
        props: dict[str, dict] = {}
        for f in self.output.fields:
            if isinstance(f, EnumField):
                props[f.name] = {"type": "string", "enum": list(f.values)}
            elif isinstance(f, StringField):
                props[f.name] = {"type": "string", "minLength": 1, "maxLength": f.max_length}
            else:
                p: dict[str, Any] = {"type": f.type}
                if f.minimum is not None:
                    p["minimum"] = f.minimum
                if f.maximum is not None:
                    p["maximum"] = f.maximum
                props[f.name] = p
        return {
            "type": "object",
            "properties": props,
            "required": self.field_names,
            "additionalProperties": False,
        }

    def validate_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Return `fields` in canonical order, or raise ValueError naming the bad field."""
        if not isinstance(fields, dict):
            raise ValueError("output must be a JSON object")
        extra = set(fields) - set(self.field_names)
        if extra:
            raise ValueError(f"unknown field(s) {sorted(extra)}")
        out: dict[str, Any] = {}
        for f in self.output.fields:
            if f.name not in fields:
                raise ValueError(f"missing field {f.name!r}")
            v = fields[f.name]
            if isinstance(f, EnumField):
                if v not in f.values:
                    raise ValueError(f"field {f.name!r}: {v!r} is not one of {f.values}")
            elif isinstance(f, StringField):
                if not isinstance(v, str) or not 1 <= len(v) <= f.max_length:
                    raise ValueError(f"field {f.name!r}: expected a string of 1..{f.max_length} characters")
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"field {f.name!r}: expected a number")
                if f.type == "integer" and not float(v).is_integer():
                    raise ValueError(f"field {f.name!r}: expected an integer")
                if f.minimum is not None and v < f.minimum or f.maximum is not None and v > f.maximum:
                    raise ValueError(f"field {f.name!r}: {v} is out of range")
            out[f.name] = v
        return out

    def serialize(self, fields: dict[str, Any]) -> str:
        """Canonical text of an output: schema order, compact separators unless `indent`."""
        ordered = self.validate_fields(fields)
        if self.output.indent is None:
            return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))
        return json.dumps(ordered, ensure_ascii=False, indent=self.output.indent)

    def parse(self, text: str) -> dict[str, Any]:
        """Parse and validate an output text; raises ValueError if it is not a valid output."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e.msg}") from None
        return self.validate_fields(obj)

    def output_alphabet(self) -> set[str]:
        """Every character a valid output can contain.

        With a single-character token for each of these in the kept vocabulary, any prefix
        of a valid output can always be continued, so constrained decoding never dead-ends.
        """
        chars = set('{}":,0123456789-.e+ ')
        if self.output.indent is not None:
            chars |= {"\n"}
        for f in self.output.fields:
            chars |= set(f.name)
            if isinstance(f, EnumField):
                for v in f.values:
                    chars |= set(json.dumps(v, ensure_ascii=False)[1:-1])
            elif isinstance(f, StringField):
                chars |= {chr(c) for c in range(32, 127)}
        return chars

    def fragments(self) -> list[str]:
        """Texts a valid output is made of, for the canonical-token part of the kept vocabulary."""
        frags = ["{", "}", '{"', '"}', '":"', '","', '":', ',"', '"']
        for f in self.output.fields:
            frags += [f.name, json.dumps(f.name)]
            if isinstance(f, EnumField):
                frags += [v for v in f.values] + [json.dumps(v, ensure_ascii=False) for v in f.values]
        return frags

    # ---- prompt -------------------------------------------------------------------------
    def messages(self, text: str) -> list[dict[str, str]]:
        """Chat messages for one input: system, few-shot pairs, then the user turn."""
        msgs = [{"role": "system", "content": self.prompt.system}]
        for ex in self.prompt.examples:
            msgs.append({"role": "user", "content": self.prompt.user.replace("{text}", ex.input)})
            msgs.append({"role": "assistant", "content": self.serialize(ex.output)})
        msgs.append({"role": "user", "content": self.prompt.user.replace("{text}", text)})
        return msgs

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


# ---- loading -------------------------------------------------------------------------------
def presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("microdistill.core.tasks").iterdir() if p.name.endswith(".yaml"))


def _format_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "(top level)"
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{where}: {err['msg']}{more}"


def parse_or_none(task: Task, output: str) -> dict[str, Any] | None:
    """task.parse(output), or None when the output is not a valid answer."""
    try:
        return task.parse(output)
    except ValueError:
        return None


def task_from_dict(data: Any, source: str = "<task>") -> Task:
    if not isinstance(data, dict):
        raise TaskError(f"task {source}: expected a YAML mapping at the top level")
    try:
        return Task.model_validate(data)
    except ValidationError as e:
        raise TaskError(f"task {source}: {_format_error(e)}") from None


def load_task(name_or_path: str | Path) -> Task:
    """A built-in preset by name, or a YAML file by path."""
    s = str(name_or_path)
    if s in presets():
        text = resources.files("microdistill.core.tasks").joinpath(f"{s}.yaml").read_text()
        source = f"preset {s!r}"
    else:
        path = Path(s)
        if not path.suffix and not path.exists():
            raise TaskError(f"unknown task {s!r}: not a preset ({', '.join(presets())}) nor a file")
        if not path.is_file():
            raise TaskError(f"task file {path}: not found")
        text = path.read_text()
        source = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise TaskError(f"task {source}:{where} malformed YAML: {getattr(e, 'problem', e)}") from None
    return task_from_dict(data, source)
