"""Chat templates and encoding: exact ids/labels for hand-checked conversations."""

import pytest
from data_helpers import ids, tiny_tokenizer

from steptrain.data import DataError, Segment, encode_segments, resolve_template

M = -100  # ignored label

CONVERSATION = [
    {"role": "system", "content": "you are a helpful bot."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello, how are you?"},
    {"role": "user", "content": "how is the weather?"},
    {"role": "assistant", "content": "sunny today."},
]
# <s> | <|BOT|> system you are a helpful bot . <|EOT|> | <|BOT|> human hi <|EOT|> | <|BOT|> assistant |
# hello , how are you ? <|EOT|> | <|BOT|> human how is the weather ? <|EOT|> | <|BOT|> assistant | sunny today . <|EOT|>
EXPECTED_IDS = [1, 4, 5, 9, 10, 11, 12, 13, 24, 3, 4, 6, 14, 3, 4, 7, 15, 26, 16, 10, 9, 25, 3,
                4, 6, 16, 17, 18, 19, 25, 3, 4, 7, 20, 21, 24, 3]  # fmt: skip
EXPECTED_ALL = [M] * 16 + [15, 26, 16, 10, 9, 25, 3] + [M] * 10 + [20, 21, 24, 3]
EXPECTED_LAST = [M] * 33 + [20, 21, 24, 3]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def encode(template, tok, messages, loss_on="all_assistant", max_length=1000, truncation="right"):
    segments = template.segments(messages, loss_on=loss_on)
    return encode_segments(segments, tok, max_length=max_length, truncation=truncation)


def test_vocab_sanity(tok):
    assert ids("<s> <|BOT|> system hello , ?") == [1, 4, 5, 15, 26, 25]
    assert tok("<|BOT|>human\nhello, you?<|EOT|>", add_special_tokens=False)["input_ids"] == [
        4,
        6,
        15,
        26,
        9,
        25,
        3,
    ]


def test_step_segments(tok):
    segments = resolve_template("step", tok).segments(CONVERSATION)
    assert segments == [
        Segment(
            "<s><|BOT|>system\nyou are a helpful bot.<|EOT|><|BOT|>human\nhi<|EOT|><|BOT|>assistant\n", False
        ),
        Segment("hello, how are you?<|EOT|>", True),
        Segment("<|BOT|>human\nhow is the weather?<|EOT|><|BOT|>assistant\n", False),
        Segment("sunny today.<|EOT|>", True),
    ]


@pytest.mark.parametrize("name", ["step", "jinja"])
@pytest.mark.parametrize(
    ("loss_on", "labels"), [("all_assistant", EXPECTED_ALL), ("last_assistant", EXPECTED_LAST)]
)
def test_exact_ids_and_labels(tok, name, loss_on, labels):
    enc = encode(resolve_template(name, tok), tok, CONVERSATION, loss_on=loss_on)
    assert enc.input_ids == EXPECTED_IDS
    assert enc.labels == labels


def test_step_without_bos_and_default_system(tok):
    template = resolve_template("step", tok, bos=False, default_system="you are a bot.")
    enc = encode(
        template, tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]
    )
    # <|BOT|> system you are a bot . <|EOT|> <|BOT|> human hi <|EOT|> <|BOT|> assistant | hello ! <|EOT|>
    assert enc.input_ids == [4, 5, 9, 10, 11, 13, 24, 3, 4, 6, 14, 3, 4, 7, 15, 27, 3]
    assert enc.labels == [M] * 14 + [15, 27, 3]
    # a system message in the conversation wins over the default
    assert encode(template, tok, CONVERSATION).input_ids == EXPECTED_IDS[1:]


def test_tool_role_maps_to_input(tok):
    messages = [
        {"role": "user", "content": "call tool"},
        {"role": "assistant", "content": "ok"},
        {"role": "tool", "content": "result"},
        {"role": "assistant", "content": "good"},
    ]
    for name in ("step", "jinja"):
        enc = encode(resolve_template(name, tok), tok, messages)
        assert enc.input_ids == [1, 4, 6, 28, 29, 3, 4, 7, 31, 3, 4, 8, 30, 3, 4, 7, 32, 3]
        assert enc.labels == [M] * 8 + [31, 3] + [M] * 6 + [32, 3]


def test_generation_prompt_matches_between_templates(tok):
    prompt = CONVERSATION[:4]
    expected = (
        "<s><|BOT|>system\nyou are a helpful bot.<|EOT|><|BOT|>human\nhi<|EOT|><|BOT|>assistant\n"
        "hello, how are you?<|EOT|><|BOT|>human\nhow is the weather?<|EOT|><|BOT|>assistant\n"
    )
    assert resolve_template("step", tok).generation_prompt(prompt) == expected
    assert resolve_template("jinja", tok).generation_prompt(prompt) == expected


def test_jinja_trailing_user_turn_is_context(tok):
    segments = resolve_template("jinja", tok).segments(CONVERSATION[1:4])
    assert segments == [
        Segment("<s><|BOT|>human\nhi<|EOT|><|BOT|>assistant\n", False),
        Segment("hello, how are you?<|EOT|>", True),
        Segment("<|BOT|>human\nhow is the weather?<|EOT|>", False),
    ]


def test_jinja_not_prefix_stable_raises():
    # Like reasoning templates that hide earlier replies: the first reply is rendered differently once
    # it is no longer the last message.
    unstable = (
        "{% for m in messages %}{{ m['role'] }}: "
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = tiny_tokenizer(chat_template=unstable)
    template = resolve_template("jinja", tok)
    assert template.segments(CONVERSATION[:3])[-1] == Segment("hello, how are you?", True)  # one turn is fine
    with pytest.raises(DataError, match=r"^chat template is not prefix-stable: .*use data.template=step or plain$"):
        template.segments(CONVERSATION)


def test_step_requires_single_token_markers():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    plain = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "hi": 2}, unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=plain, bos_token="<s>", unk_token="<unk>")
    with pytest.raises(DataError, match=r"^data.template=step but <\|BOT\|> is not a single token"):
        resolve_template("step", tok)


def test_jinja_requires_a_chat_template():
    with pytest.raises(DataError, match="no chat_template"):
        resolve_template("jinja", tiny_tokenizer(chat_template=None))


# --- encode_segments: truncation -------------------------------------------------------------------

SEGMENTS = [
    Segment("<s><|BOT|>human\nhi<|EOT|><|BOT|>assistant\n", False),
    Segment("hello, how are you?<|EOT|>", True),
]
# ids: 1 4 6 14 3 4 7 | 15 26 16 10 9 25 3  (14 tokens, 7 trained)


def test_no_truncation_first_label_forced(tok):
    enc = encode_segments(SEGMENTS, tok, max_length=14, truncation="drop", source="f.jsonl:3")
    assert enc.input_ids == [1, 4, 6, 14, 3, 4, 7, 15, 26, 16, 10, 9, 25, 3]
    assert enc.labels == [M] * 7 + [15, 26, 16, 10, 9, 25, 3]
    assert enc.source == "f.jsonl:3"
    # a trained first token is never a target: it has no context inside the example
    enc = encode_segments([Segment("hello how", True)], tok, max_length=8, truncation="right")
    assert (enc.input_ids, enc.labels) == ([15, 16], [M, 16])


def test_truncate_right(tok):
    enc = encode_segments(SEGMENTS, tok, max_length=10, truncation="right")
    assert enc.input_ids == [1, 4, 6, 14, 3, 4, 7, 15, 26, 16]
    assert enc.labels == [M] * 7 + [15, 26, 16]


def test_truncate_left(tok):
    enc = encode_segments(SEGMENTS, tok, max_length=10, truncation="left")
    assert enc.input_ids == [3, 4, 7, 15, 26, 16, 10, 9, 25, 3]
    assert enc.labels == [M, M, M, 15, 26, 16, 10, 9, 25, 3]
    # left truncation into the reply: its new first token loses its label
    enc = encode_segments(SEGMENTS, tok, max_length=4, truncation="left")
    assert (enc.input_ids, enc.labels) == ([10, 9, 25, 3], [M, 9, 25, 3])


def test_truncate_drop(tok):
    assert encode_segments(SEGMENTS, tok, max_length=13, truncation="drop") is None


def test_reply_truncated_away_returns_none(tok):
    assert encode_segments(SEGMENTS, tok, max_length=7, truncation="right") is None
    assert encode_segments(SEGMENTS, tok, max_length=8, truncation="right").labels == [M] * 7 + [15]
    assert encode_segments([Segment("hello", True)], tok, max_length=8, truncation="right") is None
    assert encode_segments([], tok, max_length=8, truncation="right") is None


def test_bad_truncation_name(tok):
    with pytest.raises(ValueError, match="truncation must be one of right, left, drop"):
        encode_segments(SEGMENTS, tok, max_length=8, truncation="middle")
