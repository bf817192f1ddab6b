"""Reading ms-swift rows: exact error locations, skip counting, HF datasets inputs, load_sft_data."""

import json

import pytest
from data_helpers import chat, data_cfg, run_inputs, tiny_tokenizer, write_jsonl

from steptrain.data import DataError, load_sft_data, read_rows

GOOD = chat(("user", "hi"), ("assistant", "hello!"))

# (bad line, the message after "path:3: ", the skip-count reason)
BAD_LINES = [
    ('{"messages": [}', "invalid JSON: Expecting value (col 15)", "invalid JSON"),
    (
        '{"messages": [{"role": "user" "content": "x"}]}',
        "invalid JSON: Expecting ',' delimiter (col 31)",
        "invalid JSON",
    ),
    ("[1, 2]", "not an object: got list", "not an object"),
    ('{"messages": []}', "missing or empty messages", "missing or empty messages"),
    ('{"text": "hi"}', "missing or empty messages", "missing or empty messages"),
    ('{"messages": "hi"}', "messages is not a list: got str", "messages is not a list"),
    ('{"messages": ["hi"]}', "message is not an object: message 1 is str", "message is not an object"),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
        "unknown role: message 2 has role 'bot'; valid roles: system, user, assistant, tool",
        "unknown role",
    ),
    (
        '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]}',
        "content is not a string: message 1 (user) has int",
        "content is not a string",
    ),
    (
        '{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}',
        "content is not a string: message 1 (user) has null",
        "content is not a string",
    ),
    ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant turn", "no assistant turn"),
    (json.dumps({**GOOD, "system": 3}), "system is not a string: got int", "system is not a string"),
    (
        json.dumps({"system": "s", **chat(("system", "t"), ("user", "a"), ("assistant", "b"))}),
        "conflicting system: both a 'system' key and a system message",
        "conflicting system",
    ),
]


@pytest.mark.parametrize(("line", "message", "reason"), BAD_LINES)
def test_bad_line_reported_with_its_line_number(tmp_path, line, message, reason):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", line, GOOD])  # line 2 is blank: not an error
    with pytest.raises(DataError) as err:
        read_rows([path])
    assert str(err.value) == f"{path}:3: {message}"
    assert "\n" not in str(err.value)
    assert (err.value.location, err.value.reason) == (f"{path}:3", reason)


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=r":2: invalid UTF-8: byte 15$"):
        read_rows([str(path)])


def test_skip_counts_by_reason_and_keeps_good_rows(tmp_path):
    lines = [GOOD] + [line for line, _, _ in BAD_LINES] + ["   ", {**GOOD, "audios": ["a.mp3"]}]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    rows, skipped = read_rows([path], on_error="skip")
    assert [row["_source"] for row in rows] == [f"{path}:1", f"{path}:{len(lines)}"]
    assert rows[1] == {**GOOD, "audios": ["a.mp3"], "_source": f"{path}:{len(lines)}"}  # other keys kept
    expected: dict[str, int] = {}
    for _, _, reason in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    assert skipped == expected
    assert sum(skipped.values()) == len(BAD_LINES)


def test_several_files_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD, GOOD])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(("user", "x"), ("assistant", "y"))])
    rows, skipped = read_rows([a, b])
    assert [r["_source"] for r in rows] == [f"{a}:1", f"{a}:2", f"{b}:1"]
    assert skipped == {}


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found$"):
        read_rows([str(tmp_path / "nope.jsonl")], on_error="skip")  # not a row problem: never skipped
    (tmp_path / "x.txt").write_text("{}")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows([str(tmp_path / "x.txt")])


def test_json_list_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD, {"messages": [{"role": "user", "content": "a"}]}]))
    with pytest.raises(DataError, match=rf"^{path}:row 2: no assistant turn$"):
        read_rows([str(path)])
    rows, skipped = read_rows([str(path)], on_error="skip")
    assert [r["_source"] for r in rows] == [f"{path}:row 1"] and skipped == {"no assistant turn": 1}
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]')
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON: Expecting value \(col 17\)$"):
        read_rows([str(path)], on_error="skip")  # the whole file is unreadable
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD))  # .json holding JSON lines
    assert len(read_rows([str(path)])[0]) == 2


HF_ROWS = [
    {**GOOD, "system": "be nice"},
    {"messages": [{"role": "user", "content": "a"}], "system": None},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "system": None},
]


def test_parquet_via_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))  # stay hermetic
    path = str(tmp_path / "train.parquet")
    datasets.Dataset.from_list(HF_ROWS).to_parquet(path)
    with pytest.raises(DataError, match=rf"^{path}:row 2: no assistant turn$"):
        read_rows([path])
    rows, skipped = read_rows([path], on_error="skip")
    assert skipped == {"no assistant turn": 1}
    assert rows == [
        {**GOOD, "system": "be nice", "_source": f"{path}:row 1"},
        {**HF_ROWS[2], "_source": f"{path}:row 3"},
    ]


def test_save_to_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = str(tmp_path / "ds")
    datasets.Dataset.from_list(HF_ROWS).save_to_disk(path)
    rows, skipped = read_rows([path], on_error="skip")
    assert [r["_source"] for r in rows] == [f"{path}:row 1", f"{path}:row 3"]
    assert rows[0]["messages"] == GOOD["messages"] and skipped == {"no assistant turn": 1}
    datasets.DatasetDict({"train": datasets.Dataset.from_list(HF_ROWS[:1])}).save_to_disk(path + "_dict")
    assert len(read_rows([path + "_dict"])[0]) == 1


def test_csv_messages_as_json_text(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    path = tmp_path / "train.csv"
    path.write_text('messages\n"' + json.dumps(GOOD["messages"]).replace('"', '""') + '"\n"[{""role"": }]"\n')
    with pytest.raises(
        DataError, match=rf"^{path}:row 2: invalid JSON: messages: Expecting value \(col 11\)$"
    ):
        read_rows([str(path)])
    rows, skipped = read_rows([str(path)], on_error="skip")
    assert rows == [{**GOOD, "_source": f"{path}:row 1"}] and skipped == {"invalid JSON": 1}


def test_directory_that_is_not_a_dataset(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match=rf"^{tmp_path}: not a save_to_disk directory"):
        read_rows([str(tmp_path)])


LONG_QUESTION = "how is the weather today ? how is the weather today ?"


def test_load_sft_data_end_to_end(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {**chat(("user", "hi"), ("assistant", "hello!")), "system": "you are a bot."},
            chat(("user", "hi"), ("assistant", "hello, how are you?")),
            "not json",
            chat(("user", LONG_QUESTION), ("assistant", "sunny")),
        ],
    )
    cfg = data_cfg(max_length=20, on_error="skip", system="you are good.")
    data = load_sft_data([path], tok, cfg, run_inputs(tok, cfg))
    M = -100
    a, b = data.examples
    # <s> <|BOT|> system you are a bot . <|EOT|> <|BOT|> human hi <|EOT|> <|BOT|> assistant | hello ! <|EOT|>
    assert a.input_ids == [1, 4, 5, 9, 10, 11, 13, 24, 3, 4, 6, 14, 3, 4, 7, 15, 27, 3]
    assert a.labels == [M] * 15 + [15, 27, 3] and a.source == f"{path}:1"
    # default system; 21 tokens cut to 20 (the final <|EOT|> goes)
    assert b.input_ids == [1, 4, 5, 9, 10, 32, 24, 3, 4, 6, 14, 3, 4, 7, 15, 26, 16, 10, 9, 25]
    assert b.labels == [M] * 14 + [15, 26, 16, 10, 9, 25] and b.source == f"{path}:2"
    assert data.stats == {
        "rows": 3, "audio_clips": 0, "skipped": {"invalid JSON": 1}, "truncated": 1, "dropped_too_long": 0,
        "dropped_no_labels": 1, "tokens": 38, "label_tokens": 9,
    }  # fmt: skip

    # rows already read (e.g. after an eval split): the same examples; reader skips are the caller's
    rows, skipped = read_rows([path], on_error="skip")
    from_rows = load_sft_data(rows, tok, cfg, run_inputs(tok, cfg))
    assert from_rows.examples == data.examples and from_rows.stats == {**data.stats, "skipped": {}}

    cfg.truncation = "drop"
    data = load_sft_data([path], tok, cfg, run_inputs(tok, cfg))
    assert [e.source for e in data.examples] == [f"{path}:1"]
    assert data.stats["dropped_too_long"] == 2 and data.stats["truncated"] == 0

    c = data_cfg(max_length=20)
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        load_sft_data([path], tok, c, run_inputs(tok, c))


def test_load_sft_data_template_errors(tmp_path):
    refuses_tools = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool turns unsupported') }}"
        "{% endif %}{{ m['role'] }}: {{ m['content'] }};{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [GOOD, chat(("user", "call tool"), ("assistant", "ok"), ("tool", "result"), ("assistant", "good"))],
    )
    tok = tiny_tokenizer(chat_template=refuses_tools)
    c = data_cfg(template="jinja")
    with pytest.raises(DataError, match=rf"^{path}:2: chat template error: tool turns unsupported$"):
        load_sft_data([path], tok, c, run_inputs(tok, c))
    c = data_cfg(template="jinja", on_error="skip")
    data = load_sft_data([path], tok, c, run_inputs(tok, c))
    assert len(data.examples) == 1 and data.stats["skipped"] == {"chat template error": 1}
    # "user: hi;assistant: " | "hello!;" (words missing from VOCAB, and "!;" as one piece, are <unk>=0)
    assert data.examples[0].input_ids == [0, 0, 14, 0, 7, 0, 15, 0]
    assert data.examples[0].labels == [-100] * 6 + [15, 0]

    unstable = "{% for m in messages %}{{ m['content'] if loop.last else '.' }}{% endfor %}"
    c = data_cfg(template="jinja", on_error="skip")
    with pytest.raises(DataError, match=rf"^{path}:1: chat template is not prefix-stable"):
        load_sft_data([path], utok := tiny_tokenizer(chat_template=unstable), c, run_inputs(utok, c))
