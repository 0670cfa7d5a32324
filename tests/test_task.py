"""The Task model on its own: presets load, outputs serialise in canonical order and parse back,
bad values and bad task files are one-line errors naming the field, and the fingerprint tracks
exactly the task's content."""

from __future__ import annotations

import json

import pytest

from microdistill.core.task import EnumField, NumberField, StringField, Task, TaskError, load_task, presets, task_from_dict

REDDIT = {"tone": "neutral", "sentiment": "positive", "safety": "safe", "toxicity": "respectful"}


def small_task(**output) -> dict:
    """A task dict with an enum, a string, an integer and a number field."""
    return {
        "name": "small",
        "prompt": {"system": "Label it.", "user": "Text: {text}",
                   "examples": [{"input": "hi", "output": {"kind": "b", "note": "greeting", "count": 1, "score": 0.5}}]},
        "output": {"fields": [
            {"name": "kind", "values": ["a", "b", "c"]},
            {"name": "note", "type": "string", "max_length": 10},
            {"name": "count", "type": "integer", "minimum": 0, "maximum": 5},
            {"name": "score", "type": "number", "minimum": 0.0, "maximum": 1.0},
        ], **output},
    }


def test_presets_load():
    names = presets()
    assert {"reddit-comment", "support-ticket"} <= set(names)
    for name in names:
        task = load_task(name)
        assert isinstance(task, Task) and task.name == name
        assert task.field_names and task.prompt.examples
        for ex in task.prompt.examples:  # every few-shot answer is itself a valid output
            assert task.parse(task.serialize(ex.output)) == ex.output
    reddit = load_task("reddit-comment")
    assert reddit.field_names == ["tone", "sentiment", "safety", "toxicity"]
    assert all(isinstance(f, EnumField) for f in reddit.output.fields)
    ticket = load_task("support-ticket")
    assert [type(f) for f in ticket.output.fields] == [EnumField, EnumField, StringField]
    assert [f.name for f in ticket.enum_fields] == ["team", "urgency"]


def test_serialize_is_canonical_and_parses_back():
    task = load_task("reddit-comment")
    shuffled = dict(reversed(list(REDDIT.items())))
    text = task.serialize(shuffled)
    assert text == '{"tone":"neutral","sentiment":"positive","safety":"safe","toxicity":"respectful"}'
    parsed = task.parse(text)
    assert parsed == REDDIT and list(parsed) == task.field_names
    # parse puts a valid object in any key order and spacing into canonical order
    loose = json.dumps(shuffled, indent=2)
    assert list(task.parse(loose)) == task.field_names
    assert task.serialize(task.parse(loose)) == text


def test_indent_changes_the_text_not_the_fields():
    task = task_from_dict(small_task(indent=2))
    fields = {"score": 0.25, "count": 3, "note": "x y", "kind": "c"}
    text = task.serialize(fields)
    assert text == json.dumps({"kind": "c", "note": "x y", "count": 3, "score": 0.25}, indent=2)
    assert "\n" in task.output_alphabet() and task.parse(text) == fields


@pytest.mark.parametrize("fields, message", [
    ({**REDDIT, "tone": "angry"}, "field 'tone': 'angry' is not one of"),
    ({k: v for k, v in REDDIT.items() if k != "safety"}, "missing field 'safety'"),
    ({**REDDIT, "extra": "x"}, "unknown field(s) ['extra']"),
    (["not", "an", "object"], "output must be a JSON object"),
])
def test_validate_fields_names_the_bad_field(fields, message):
    task = load_task("reddit-comment")
    with pytest.raises(ValueError) as e:
        task.validate_fields(fields)
    assert message in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"note": ""}, "field 'note': expected a string of 1..10"),
    ({"note": "x" * 11}, "field 'note': expected a string of 1..10"),
    ({"count": 2.5}, "field 'count': expected an integer"),
    ({"count": True}, "field 'count': expected a number"),
    ({"count": 6}, "field 'count': 6 is out of range"),
    ({"score": -0.1}, "field 'score': -0.1 is out of range"),
    ({"score": "0.5"}, "field 'score': expected a number"),
])
def test_string_and_number_fields_are_checked(change, message):
    task = task_from_dict(small_task())
    good = {"kind": "a", "note": "fine", "count": 2, "score": 1.0}
    assert task.validate_fields(good) == good
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        task.validate_fields({**good, **change})


def test_parse_rejects_text_that_is_not_json():
    with pytest.raises(ValueError, match="not JSON"):
        load_task("reddit-comment").parse('{"tone":"neutral",')


@pytest.mark.parametrize("edit, where", [
    (lambda d: d["output"]["fields"][0].update(values=["a"]), "output.fields.0"),
    (lambda d: d["output"].update(fieldz=[]), "output.fieldz"),
    (lambda d: d["prompt"].update(user="no placeholder"), "prompt.user"),
    (lambda d: d["prompt"].update(user="{text} from {other}"), "prompt.user: Value error, the user template has placeholder(s) {other}; only {text}"),
    (lambda d: d["inputs"].update(min_tokens=50, max_tokens=10), "inputs"),
    (lambda d: d["output"]["fields"].append({"name": "kind", "values": ["x", "y"]}), "output.fields"),
    (lambda d: d.update(name="has space"), "name"),
])
def test_task_from_dict_errors_name_the_field_path(edit, where):
    data = small_task()
    data["inputs"] = {}
    edit(data)
    with pytest.raises(TaskError) as e:
        task_from_dict(data, "my.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"task my.yaml: {where}")


def test_task_from_dict_rejects_a_non_mapping():
    with pytest.raises(TaskError, match="expected a YAML mapping"):
        task_from_dict(["a", "list"], "x.yaml")


def test_invalid_few_shot_output_is_rejected():
    data = small_task()
    data["prompt"]["examples"].append({"input": "bad", "output": {"kind": "z", "note": "n", "count": 1, "score": 0.1}})
    with pytest.raises(TaskError) as e:
        task_from_dict(data, "x.yaml")
    msg = str(e.value)
    assert "prompt.examples.1.output" in msg and "field 'kind': 'z' is not one of" in msg
    assert "\n" not in msg
    data["prompt"]["examples"][1]["output"].pop("kind")
    with pytest.raises(TaskError, match=r"prompt\.examples\.1\.output: missing field 'kind'"):
        task_from_dict(data, "x.yaml")


def test_json_schema_lists_enum_values_in_order():
    task = task_from_dict(small_task())
    schema = task.json_schema()
    assert list(schema["properties"]) == ["kind", "note", "count", "score"]
    assert schema["properties"]["kind"] == {"type": "string", "enum": ["a", "b", "c"]}
    assert schema["properties"]["note"] == {"type": "string", "minLength": 1, "maxLength": 10}
    assert schema["properties"]["count"] == {"type": "integer", "minimum": 0, "maximum": 5}
    assert schema["properties"]["score"] == {"type": "number", "minimum": 0.0, "maximum": 1.0}
    assert schema["required"] == ["kind", "note", "count", "score"] and schema["additionalProperties"] is False
    assert isinstance(task.output.fields[2], NumberField)
    reddit = load_task("reddit-comment").json_schema()
    assert reddit["properties"]["sentiment"]["enum"] == ["negative", "neutral", "positive"]


def test_fingerprint_tracks_the_content():
    a, b = load_task("reddit-comment"), load_task("reddit-comment")
    assert a.fingerprint() == b.fingerprint()
    assert task_from_dict(a.model_dump()).fingerprint() == a.fingerprint()  # survives the manifest round trip
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0
    d = a.model_dump()
    d["output"]["fields"][1]["values"] = ["negative", "neutral", "positive", "mixed"]
    assert task_from_dict(d).fingerprint() != a.fingerprint()
    d = a.model_dump()
    d["prompt"]["system"] += " Be brief."
    assert task_from_dict(d).fingerprint() != a.fingerprint()
    d = a.model_dump()
    d["output"]["max_tokens"] = 51
    assert task_from_dict(d).fingerprint() != a.fingerprint()


def test_messages_hold_the_few_shot_turns():
    task = task_from_dict(small_task())
    msgs = task.messages("hello there")
    assert msgs == [
        {"role": "system", "content": "Label it."},
        {"role": "user", "content": "Text: hi"},
        {"role": "assistant", "content": '{"kind":"b","note":"greeting","count":1,"score":0.5}'},
        {"role": "user", "content": "Text: hello there"},
    ]


def test_load_task_errors(tmp_path):
    with pytest.raises(TaskError, match="not found") as e:
        load_task(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(e.value)
    with pytest.raises(TaskError, match="unknown task 'no-such-preset': not a preset"):
        load_task("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nprompt: [unclosed\n")
    with pytest.raises(TaskError, match=r"line \d+ malformed YAML"):
        load_task(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("name: x\nprompt: {system: s}\noutput: {fields: [{name: a, values: [p]}]}\n")
    with pytest.raises(TaskError, match=rf"task {wrong}: output\.fields\.0"):
        load_task(wrong)


def test_load_task_from_a_file_equals_the_dict(tmp_path):
    import yaml

    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(small_task(), sort_keys=False))
    assert load_task(path) == task_from_dict(small_task())
    assert load_task(str(path)).fingerprint() == task_from_dict(small_task()).fingerprint()


def test_fingerprint_ignores_the_key_order_of_few_shot_outputs():
    """Two equal tasks (same prompt messages, `==`) must share a fingerprint: shards are refused
    on a fingerprint mismatch, so writing an example's keys in another order in the YAML must
    not make the same task look like another one."""
    a = load_task("reddit-comment")
    d = a.model_dump()
    d["prompt"]["examples"][0]["output"] = dict(reversed(list(d["prompt"]["examples"][0]["output"].items())))
    b = task_from_dict(d)
    assert a == b and a.messages("x") == b.messages("x")
    assert a.fingerprint() == b.fingerprint()
