"""rollout/data.py: loader errors name file:line; the cursor; the synthetic task."""

from __future__ import annotations

import json
import os
import re

import pytest

from rollout.data import Cursor, DataError, load_rows, make_synthetic, write_jsonl


def write_lines(tmp_path, lines: list[str], name: str = "rows.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_rows_roundtrip_keeps_extra_fields(tmp_path):
    rows = [{"prompt": "ab=", "answer": "ba", "level": 3}, {"prompt": "c=", "answer": "c"}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    assert load_rows(tmp_path / "p.jsonl", "prompts") == rows


def test_load_rows_malformed_json_names_file_and_line(tmp_path):
    # line 2 is blank (skipped, but still counted), the bad JSON is on line 3 of the file
    path = write_lines(tmp_path, ['{"prompt": "a=", "answer": "a"}', "", '{"prompt": "b=", "answer": '])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: not valid JSON"):
        load_rows(path, "prompts")


def test_load_rows_missing_field_names_file_line_and_field(tmp_path):
    path = write_lines(tmp_path, ['{"prompt": "a=", "response": "a"}', '{"prompt": "b="}'])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: field 'response'"):
        load_rows(path, "expert")
    # the same rows lack 'answer' already on line 1 for the prompt set
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:1: field 'answer'"):
        load_rows(path, "prompts")


def test_load_rows_non_string_field_and_non_object_row(tmp_path):
    path = write_lines(tmp_path, ['{"prompt": "a=", "answer": 42}'])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:1: field 'answer'"):
        load_rows(path, "eval")
    path = write_lines(tmp_path, ['{"prompt": "a=", "answer": "a"}', '["a=", "a"]'], "list.jsonl")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: a row must be a JSON object"):
        load_rows(path, "eval")


def test_load_rows_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_rows(tmp_path / "absent.jsonl", "prompts")
    with pytest.raises(DataError, match="no rows"):
        load_rows(write_lines(tmp_path, [""]), "prompts")


def test_load_rows_skip_mode_leaves_bad_rows_out_and_names_each(tmp_path):
    lines = ['{"prompt": "a=", "answer": "a"}', '{"prompt": "b=",', '[1, 2]', '{"prompt": "c="}',
             '{"prompt": "d=", "answer": "d", "extra": 1}', '{"prompt": 5, "answer": "e"}']
    path = write_lines(tmp_path, lines)
    skipped: list[str] = []
    rows = load_rows(path, "prompts", skipped)
    assert [r["prompt"] for r in rows] == ["a=", "d="]  # lines 1 and 5
    assert skipped == [f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes)",
                       f"{path}:3: a row must be a JSON object, got list",
                       f"{path}:4: field 'answer' (a string) is missing",
                       f"{path}:6: field 'prompt' (a string) is missing"]
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: not valid JSON"):
        load_rows(path, "prompts")  # the default stops at the first
    with pytest.raises(DataError, match=r"no rows \(2 bad ones skipped\)"):
        load_rows(write_lines(tmp_path, ["{", "[]"]), "prompts", [])


def test_load_rows_parquet_names_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "e.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a=", "response": "a"}, {"prompt": "b=", "response": None}]),
                   path)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: row 2: field 'response'"):
        load_rows(path, "expert")


# Files a user or a pipeline gets wrong (issue 13): each gives file:line (or file) and a reason, never a traceback
# from inside the parser; data.on_bad_row: skip leaves the bad line out and goes on.
GOOD = '{"prompt": "a=", "answer": "a"}'


@pytest.mark.parametrize("line, reason", [
    (b'{"prompt": "\xff\xfe=", "answer": "a"}', r"not valid UTF-8 \(byte 13 of the line, 0xff\)"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to read"),
    (b'{"prompt": "a=", "answer": ' + b"9" * 5000 + b"}", r"not valid JSON \(Exceeds the limit"),
    (b'{"prompt": "\\ud800=", "answer": "a"}', "a string holds a lone UTF-16 surrogate"),
    (b'"just a string"', "a row must be a JSON object, got str"),
    (b"42", "a row must be a JSON object, got int"),
    (b"null", "a row must be a JSON object, got NoneType"),
])
def test_a_bad_line_names_file_line_and_reason_or_is_skipped(tmp_path, line, reason):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + line + b"\n" + GOOD.encode() + b"\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: {reason}"):
        load_rows(path, "prompts")
    skipped: list[str] = []
    assert len(load_rows(path, "prompts", skipped)) == 2  # lines 1 and 3
    assert len(skipped) == 1 and re.match(f"^{re.escape(str(path))}:2: {reason}", skipped[0])


def test_a_surrogate_pair_is_text(tmp_path):
    # an escaped emoji is two surrogates that make one character: not the lone one refused above
    path = write_lines(tmp_path, ['{"prompt": "\\ud83d\\ude00=", "answer": "a"}'])
    assert load_rows(path, "prompts")[0]["prompt"] == "\U0001F600="


def test_an_empty_file_says_so(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: no rows$"):
        load_rows(path, "prompts")


@pytest.mark.parametrize("content", [b"", b"PAR1 not really parquet PAR1", b"\x00" * 64])
def test_a_corrupt_parquet_file_names_the_file(tmp_path, content):
    pytest.importorskip("pyarrow")
    path = tmp_path / "rows.parquet"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: not a readable Parquet file \\(.+\\)$"):
        load_rows(path, "prompts")
    with pytest.raises(DataError):  # a file that cannot be read at all is not a bad row to skip
        load_rows(path, "prompts", [])


def test_a_cut_parquet_file_names_the_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": f"{i}=", "answer": str(i)} for i in range(100)]), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: not a readable Parquet file"):
        load_rows(path, "prompts")


def test_an_unreadable_file_names_it(tmp_path):
    path = write_lines(tmp_path, [GOOD])
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("root reads a file of mode 000")
        with pytest.raises(DataError, match=f"^{re.escape(str(path))}: cannot read the prompts data file"):
            load_rows(path, "prompts")
    finally:
        path.chmod(0o644)


# --- Cursor -----------------------------------------------------------------------------------------------------


def test_cursor_yields_a_permutation_per_epoch():
    c = Cursor(7, seed=5)
    epochs = [c.take(7) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(7))
    assert len({tuple(o) for o in epochs}) > 1  # a fresh shuffle each epoch, not the same order again
    assert (c.epoch, c.pos) == (3, 0)


def test_cursor_is_deterministic_and_chunking_does_not_matter():
    whole = Cursor(10, seed=1).take(25)  # crosses two epoch boundaries
    c = Cursor(10, seed=1)
    chunks = c.take(3) + c.take(9) + c.take(1) + c.take(12)
    assert chunks == whole
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:20]) == list(range(10))
    assert Cursor(10, seed=2).take(10) != whole[:10]  # the seed matters


def test_cursor_resumes_from_saved_state():
    # Scheduler.state() saves cursor.state(); a cursor rebuilt from it continues the same sequence.
    a = Cursor(6, seed=9)
    a.take(4)
    assert a.state() == {"size": 6, "seed": 9, "epoch": 0, "pos": 4}  # not the cached permutation
    b = Cursor(**a.state())
    assert a.take(10) == b.take(10)


# --- synthetic task ---------------------------------------------------------------------------------------------

_KW = dict(seed=0, alphabet="abcd", min_len=2, max_len=4, num_prompts=300, num_expert=300, num_eval=40)


@pytest.mark.parametrize("task, answer", [("reverse", lambda s: s[::-1]), ("sort", lambda s: "".join(sorted(s)))])
def test_synthetic_answers_are_correct(task, answer):
    data = make_synthetic(task, **_KW)
    assert [len(data[k]) for k in ("prompts", "expert", "eval")] == [300, 300, 40]
    for kind, field in (("prompts", "answer"), ("expert", "response"), ("eval", "answer")):
        for row in data[kind]:
            s = row["prompt"]
            assert s.endswith("=")
            s = s[:-1]
            assert 2 <= len(s) <= 4 and set(s) <= set("abcd")
            assert row[field] == answer(s)


def test_synthetic_reverse_by_hand():
    # the rule itself, on one row: "abc=" -> "cba"
    row = make_synthetic("reverse", **_KW)["prompts"][0]
    assert row["answer"] == "".join(reversed(row["prompt"][:-1]))
    assert any(r["answer"] != r["prompt"][:-1] for r in make_synthetic("reverse", **_KW)["prompts"])  # not identity


def test_synthetic_eval_is_disjoint_and_deterministic():
    data = make_synthetic("reverse", **_KW)
    held = {r["prompt"] for r in data["eval"]}
    assert len(held) == 40  # distinct held-out strings
    assert held.isdisjoint(r["prompt"] for r in data["prompts"])
    assert held.isdisjoint(r["prompt"] for r in data["expert"])
    assert make_synthetic("reverse", **_KW) == data
    assert make_synthetic("reverse", **{**_KW, "seed": 1}) != data
    json.dumps(data)  # writable as JSONL


def test_synthetic_refuses_too_small_universe():
    # alphabet "ab", lengths 1..2: 2 + 4 = 6 strings; 2 held-out rows need 4 * 2 = 8 > 6
    with pytest.raises(ValueError, match="only 6 distinct strings"):
        make_synthetic("reverse", seed=0, alphabet="ab", min_len=1, max_len=2,
                       num_prompts=1, num_expert=1, num_eval=2)


def test_synthetic_rows_load_back(tmp_path):
    data = make_synthetic("sort", **{**_KW, "seed": 7})
    for kind, rows in data.items():
        write_jsonl(tmp_path / f"{kind}.jsonl", rows)
        assert load_rows(tmp_path / f"{kind}.jsonl", kind) == rows


def test_synthetic_json_rows_carry_a_schema_their_answer_satisfies():
    jsonschema = pytest.importorskip("jsonschema")
    data = make_synthetic("json", **_KW)
    assert [len(data[k]) for k in ("prompts", "expert", "eval")] == [300, 300, 40]
    for kind, field in (("prompts", "answer"), ("expert", "response"), ("eval", "answer")):
        for row in data[kind]:
            s = row["prompt"][:-1]
            # the canonical text: compact separators, "r" then "n" ("abc=" -> {"r":"cba","n":3})
            assert row[field] == '{"r":"' + s[::-1] + '","n":' + str(len(s)) + "}"
            if kind == "expert":
                assert set(row) == {"prompt", "response"}
                continue
            schema = row["schema"]
            jsonschema.Draft202012Validator.check_schema(schema)
            assert schema["additionalProperties"] is False and set(schema["required"]) == {"r", "n"}
            jsonschema.validate(json.loads(row[field]), schema)
    schema = data["prompts"][0]["schema"]
    for wrong in ({"r": "ab"}, {"r": "ab", "n": "2"}, {"r": "ab", "n": 2, "extra": 1}, ["ab", 2]):
        assert not jsonschema.Draft202012Validator(schema).is_valid(wrong), wrong


def test_synthetic_json_is_deterministic_disjoint_and_scored_by_json_schema(tmp_path):
    from rewards.structured import json_schema

    data = make_synthetic("json", **_KW)
    assert make_synthetic("json", **_KW) == data
    assert make_synthetic("json", **{**_KW, "seed": 1}) != data
    held = {r["prompt"] for r in data["eval"]}
    assert len(held) == 40
    assert held.isdisjoint(r["prompt"] for r in data["prompts"])
    assert held.isdisjoint(r["prompt"] for r in data["expert"])
    # the same strings as the reverse task: the json task only changes what the rows say about them
    assert [r["prompt"] for r in make_synthetic("reverse", **_KW)["prompts"]] == [r["prompt"] for r in data["prompts"]]
    for kind, rows in data.items():  # the rows survive the JSONL round trip the driver makes
        write_jsonl(tmp_path / f"{kind}.jsonl", rows)
        assert load_rows(tmp_path / f"{kind}.jsonl", kind) == rows
    rows = data["prompts"][:3]
    scores = json_schema([r["prompt"] for r in rows], [r["answer"] for r in rows], schema=[r["schema"] for r in rows],
                         answer=[r["answer"] for r in rows])
    assert [s["score"] for s in scores] == [1.0, 1.0, 1.0]
