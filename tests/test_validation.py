"""File validation at the edge: `openweights.validation`."""

from __future__ import annotations

import io
import json
import pickle
import random
import time
import tracemalloc
from pathlib import Path

import pytest

from openweights._exceptions import OpenWeightsError
from openweights.types.files import RAW_PURPOSES, VALIDATED_PURPOSES
from openweights.validation import (
    FileValidationError,
    JsonlValidator,
    validate_bytes,
    validate_fileobj,
    validate_jsonl,
)

# The README's "Data formats" examples, verbatim.
SEED_CONVERSATION = {
    "messages": [
        {"role": "user", "content": "This is a user message"},
        {"role": "assistant", "content": "This is the assistant response"},
    ]
}
SEED_BLOCKS = {
    "messages": [
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "We don't train on this text, because the weight is 0",
                    "weight": 0,
                }
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "text",
                    "text": "We have negative loss on these tokens, which means we try to minimize log-likelihood instead of maximizing it.",
                    "weight": -1,
                    "tag": "minimize",
                    "info1": "You can add as many other keys as you like, they will be ignored.",
                    "info2": "weight is only relevant for ow.weighted_sft",
                    "info3": "tag is relevant for logprobability tracking. You can track retrieve the log-probs of tokens in this content block if you use this file in a logp_callback_dataset.",
                },
                {
                    "type": "text",
                    "text": "We have positive weight on these tokens, which means we train as normal on these tokens.",
                    "weight": 1,
                    "tag": "maximize",
                },
            ],
        },
    ]
}
SEED_PREFERENCE = {
    "prompt": [
        {
            "role": "user",
            "content": "Would you use the openweights library to finetune LLMs and run batch inference",
        }
    ],
    "chosen": [{"role": "assistant", "content": "Absolutely it's a great library"}],
    "rejected": [{"role": "assistant", "content": "No I would use something else"}],
}


def jsonl(*rows: object) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def error_of(data: bytes, purpose: str = "conversations") -> FileValidationError:
    with pytest.raises(FileValidationError) as info:
        validate_bytes(data, purpose, filename="train.jsonl")
    return info.value


def msg(role: str, content: object) -> dict:
    return {"role": role, "content": content}


# --- good files -------------------------------------------------------------------------------


def test_seed_examples_validate_for_their_purposes():
    assert validate_bytes(jsonl(SEED_CONVERSATION), "conversations", filename="a") == 1
    assert validate_bytes(jsonl(SEED_BLOCKS), "conversations", filename="a") == 1
    assert validate_bytes(jsonl(SEED_BLOCKS), "weighted_conversations", filename="a") == 1
    assert validate_bytes(jsonl(SEED_PREFERENCE), "preference", filename="a") == 1


def test_pretty_printed_seed_example_is_refused_as_not_one_object_per_line():
    data = json.dumps(SEED_CONVERSATION, indent=4).encode()
    err = error_of(data)
    assert err.line == 1 and err.field is None
    assert "is the row cut off" in err.message


@pytest.mark.parametrize(
    ("purpose", "row"),
    [
        ("conversations", {"text": "plain text row"}),
        ("conversations", {"text": ""}),
        (
            "conversations",
            {"messages": [msg("system", "s"), msg("user", "u"), msg("assistant", "")]},
        ),
        ("conversations", {"messages": [msg("user", "u"), msg("tool", "42")]}),
        ("conversations", {"messages": [msg("user", [])]}),
        ("conversations", {"messages": [msg("user", [{"text": "no type key"}])]}),
        ("conversations", {"messages": [msg("user", "u")], "id": 7, "meta": {"x": [1, None]}}),
        ("conversations", {"messages": [{"role": "user", "content": "u", "name": "bob"}]}),
        ("conversations", {"messages": [msg("user", "u")], "text": 3}),  # messages win
        ("weighted_conversations", {"messages": [msg("user", "string content: default weight")]}),
        (
            "weighted_conversations",
            {"messages": [msg("assistant", [{"type": "text", "text": "t", "weight": 0.25}])]},
        ),
        (
            "preference",
            {**SEED_PREFERENCE, "chosen": [msg("assistant", [{"type": "text", "text": "b"}])]},
        ),
        ("preference", {**SEED_PREFERENCE, "score": 1.5}),
    ],
)
def test_good_rows_validate(purpose, row):
    assert validate_bytes(jsonl(row, row), purpose, filename="a") == 2


def test_blank_lines_anywhere_are_skipped_and_not_counted():
    row = json.dumps(SEED_CONVERSATION).encode()
    data = b"\n" + row + b"\n\n   \n\t\n" + row + b"\n\n\n"
    assert validate_bytes(data, "conversations", filename="a") == 2


def test_crlf_line_endings_and_missing_final_newline_are_accepted():
    row = json.dumps(SEED_CONVERSATION).encode()
    assert validate_bytes(row + b"\r\n\r\n" + row, "conversations", filename="a") == 2


def test_non_ascii_text_is_accepted():
    row = {"messages": [msg("user", "héllo wörld — 你好 🙂"), msg("assistant", "ok\u2028ok")]}
    assert validate_bytes(jsonl(row), "conversations", filename="a") == 1
    assert (
        validate_bytes(json.dumps(row, ensure_ascii=False).encode(), "conversations", filename="a")
        == 1
    )


@pytest.mark.parametrize("purpose", RAW_PURPOSES)
def test_raw_purposes_are_not_read(purpose, tmp_path):
    missing = tmp_path / "does-not-exist.bin"
    assert validate_jsonl(missing, purpose, filename="x.bin") == 0
    assert validate_bytes(b"\xff\xfe not json", purpose, filename="x.bin") == 0


def test_validate_jsonl_reads_a_path_and_validate_fileobj_a_stream(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(SEED_CONVERSATION, {"text": "t"}))
    assert validate_jsonl(path, "conversations", filename="train.jsonl") == 2
    assert validate_jsonl(str(path), "conversations", filename="train.jsonl") == 2
    assert validate_fileobj(io.BytesIO(path.read_bytes()), "conversations", filename="t") == 2


# --- bad rows ---------------------------------------------------------------------------------

GOOD = msg("user", "hi")


@pytest.mark.parametrize(
    ("purpose", "row", "field", "message"),
    [
        # row shape
        ("conversations", {}, "messages", 'needs "messages" (a list of messages) or "text"'),
        ("conversations", {"text": 5}, "text", "must be a string (got 5)"),
        ("conversations", {"text": None}, "text", "must be a string (got null)"),
        ("conversations", {"messages": "hi"}, "messages", "must be a list of messages (got 'hi')"),
        ("conversations", {"messages": {"role": "user"}}, "messages", "(got an object)"),
        ("conversations", {"messages": []}, "messages", "must not be empty"),
        # messages
        (
            "conversations",
            {"messages": [GOOD, "hi"]},
            "messages[1]",
            'must be an object like {"role"',
        ),
        ("conversations", {"messages": [GOOD, {"content": "x"}]}, "messages[1].role", "required"),
        (
            "conversations",
            {"messages": [GOOD, msg("bot", "x")]},
            "messages[1].role",
            "must be one of system, user, assistant, tool (got 'bot')",
        ),
        ("conversations", {"messages": [msg("User", "x")]}, "messages[0].role", "(got 'User')"),
        ("conversations", {"messages": [msg(["user"], "x")]}, "messages[0].role", "(got a list)"),
        ("conversations", {"messages": [{"role": "user"}]}, "messages[0].content", "required"),
        (
            "conversations",
            {"messages": [msg("assistant", None)]},
            "messages[0].content",
            "must be a string or a list of blocks (got null)",
        ),
        ("conversations", {"messages": [msg("user", 3)]}, "messages[0].content", "(got 3)"),
        (
            "conversations",
            {"messages": [msg("user", {"text": "x"})]},
            "messages[0].content",
            "(got an object)",
        ),
        # blocks
        (
            "conversations",
            {"messages": [msg("user", ["x"])]},
            "messages[0].content[0]",
            "must be an object like",
        ),
        (
            "conversations",
            {
                "messages": [
                    msg(
                        "user",
                        [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": "u"}],
                    )
                ]
            },
            "messages[0].content[1].type",
            "unsupported block type 'image_url'; only 'text' blocks are supported",
        ),
        (
            "conversations",
            {"messages": [msg("user", [{"type": 1, "text": "a"}])]},
            "messages[0].content[0].type",
            "must be 'text' (got 1)",
        ),
        (
            "conversations",
            {"messages": [msg("user", [{"type": "text"}])]},
            "messages[0].content[0].text",
            "required",
        ),
        (
            "conversations",
            {"messages": [msg("user", [{"type": "text", "text": ["a"]}])]},
            "messages[0].content[0].text",
            "must be a string (got a list)",
        ),
        (
            "conversations",
            {"messages": [msg("user", [{"text": "a", "weight": "1"}])]},
            "messages[0].content[0].weight",
            "must be a number (got '1')",
        ),
        (
            "weighted_conversations",
            {"messages": [msg("user", [{"text": "a", "weight": True}])]},
            "messages[0].content[0].weight",
            "must be a number (got true)",
        ),
        (
            "weighted_conversations",
            {"messages": [msg("user", [{"text": "a", "weight": None}])]},
            "messages[0].content[0].weight",
            "must be a number (got null)",
        ),
        (
            "weighted_conversations",
            {"messages": [msg("user", [{"text": "a", "tag": 3}])]},
            "messages[0].content[0].tag",
            "must be a string (got 3)",
        ),
        (
            "weighted_conversations",
            {
                "messages": [
                    msg("user", "a"),
                    msg("assistant", [{"text": "a"}, {"text": "b", "weight": [1]}]),
                ]
            },
            "messages[1].content[1].weight",
            "(got a list)",
        ),
        # weighted_conversations needs messages
        ("weighted_conversations", {"text": "t"}, "messages", 'needs "messages"'),
        # preference
        (
            "preference",
            {**SEED_PREFERENCE, "prompt": None},
            "prompt",
            "must be a list of messages (got null)",
        ),
        (
            "preference",
            {"chosen": SEED_PREFERENCE["chosen"]},
            "prompt",
            'needs "prompt", "chosen" and "rejected"',
        ),
        (
            "preference",
            {k: v for k, v in SEED_PREFERENCE.items() if k != "rejected"},
            "rejected",
            "required",
        ),
        ("preference", {**SEED_PREFERENCE, "prompt": []}, "prompt", "must not be empty"),
        ("preference", {**SEED_PREFERENCE, "chosen": []}, "chosen", "must not be empty"),
        ("preference", {**SEED_PREFERENCE, "chosen": "Absolutely"}, "chosen", "(got 'Absolutely')"),
        (
            "preference",
            {**SEED_PREFERENCE, "rejected": [msg("assistant", 1)]},
            "rejected[0].content",
            "(got 1)",
        ),
        ("preference", SEED_CONVERSATION, "prompt", "required"),
    ],
)
def test_bad_row_names_its_line_and_field(purpose, row, field, message):
    good = SEED_PREFERENCE if purpose == "preference" else SEED_CONVERSATION
    err = error_of(jsonl(good, good) + b"\n" + jsonl(row, good), purpose)
    assert (err.filename, err.line, err.field) == ("train.jsonl", 4, field)
    assert message in err.message
    assert str(err) == f"train.jsonl line 4, field {field}: {err.message}"


def test_error_message_format():
    bad = {"messages": [msg("user", "a"), msg("bot", "b")]}
    err = error_of(jsonl(SEED_CONVERSATION, SEED_CONVERSATION, bad))
    assert str(err) == (
        "train.jsonl line 3, field messages[1].role: "
        "must be one of system, user, assistant, tool (got 'bot')"
    )


def test_long_values_are_shortened_in_messages():
    err = error_of(jsonl({"messages": [msg("x" * 1000, "a")]}))
    assert len(str(err)) < 200 and "…" in err.message


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"[1, 2]", "each line must be a JSON object (got a list)"),
        (b'"text"', "each line must be a JSON object (got 'text')"),
        (b"null", "each line must be a JSON object (got null)"),
        (b"3", "each line must be a JSON object (got 3)"),
        (b'{"messages": [}', "invalid JSON: Expecting value at column 15"),
        (b"{'messages': []}", "invalid JSON: Expecting property name enclosed in double quotes"),
        (b'{"text": "a"} {"text": "b"}', "more after the end of the value at column 15"),
        (b'{"text": "a", "w": NaN}', "NaN is not a JSON number"),
        (b'{"text": "a", "w": -Infinity}', "-Infinity is not a JSON number"),
    ],
)
def test_line_that_is_not_a_json_object_is_refused(line, message):
    err = error_of(jsonl(SEED_CONVERSATION) + b"\n" + line + b"\n" + jsonl(SEED_CONVERSATION))
    assert (err.line, err.field) == (3, None)
    assert message in err.message
    assert str(err).startswith("train.jsonl line 3: ")


def test_truncated_last_row_is_refused_with_its_line():
    data = jsonl(SEED_CONVERSATION, SEED_CONVERSATION)
    err = error_of(data + jsonl(SEED_CONVERSATION)[:-20])
    assert err.line == 3
    assert "is the row cut off" in err.message


def test_invalid_utf8_names_line_and_byte():
    data = jsonl(SEED_CONVERSATION) + b'{"text": "caf\xe9"}\n' + jsonl(SEED_CONVERSATION)
    err = error_of(data)
    assert (err.line, err.field) == (2, None)
    assert "invalid UTF-8 (byte 0xe9 at byte 14 of the line)" in err.message


def test_utf16_file_is_refused_as_invalid_utf8():
    err = error_of(json.dumps(SEED_CONVERSATION).encode("utf-16"))
    assert err.line == 1 and "invalid UTF-8" in err.message


def test_byte_order_mark_is_refused():
    err = error_of(b"\xef\xbb\xbf" + jsonl(SEED_CONVERSATION))
    assert err.line == 1 and "byte order mark" in err.message


@pytest.mark.parametrize("purpose", VALIDATED_PURPOSES)
@pytest.mark.parametrize("data", [b"", b"\n", b"  \n\r\n\t\n"])
def test_file_without_rows_is_refused(purpose, data):
    err = error_of(data, purpose)
    assert (err.line, err.field) == (None, None)
    assert (
        str(err)
        == f"train.jsonl: the file has no rows; a {purpose} file needs one JSON object per line"
    )


def test_error_is_a_value_error_and_pickles():
    err = error_of(jsonl({"messages": []}))
    assert isinstance(err, ValueError) and isinstance(err, OpenWeightsError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.filename, copy.line, copy.field, copy.message) == (
        err.filename,
        1,
        "messages",
        err.message,
    )
    assert str(copy) == str(err)


# --- streaming --------------------------------------------------------------------------------


def _rows_with_unicode(n: int) -> bytes:
    rows = [
        {
            "messages": [
                msg("user", f"q{i} é 你好 🙂"),
                msg("assistant", [{"type": "text", "text": f"a{i}", "weight": i % 3 - 1}]),
            ]
        }
        for i in range(n)
    ]
    return b"".join(
        json.dumps(r, ensure_ascii=False).encode() + (b"\n\n" if i % 7 == 0 else b"\n")
        for i, r in enumerate(rows)
    )


def test_feeding_any_chunk_sizes_gives_the_same_result():
    data = _rows_with_unicode(200)
    rng = random.Random(0)
    for _ in range(20):
        validator = JsonlValidator("weighted_conversations", filename="a")
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 2, 3, 7, 64, 1000, 5000])
            validator.feed(data[pos : pos + step])
            pos += step
        assert validator.close() == 200


def test_error_line_is_exact_across_chunk_boundaries():
    data = bytearray(_rows_with_unicode(300))
    lines = data.split(b"\n")
    lines[250] = lines[250].replace(b'"assistant"', b'"robot"')
    data = b"\n".join(lines)
    for chunk in (1, 13, 4096, len(data)):
        validator = JsonlValidator("conversations", filename="f.jsonl")
        with pytest.raises(FileValidationError) as info:
            for pos in range(0, len(data), chunk):
                validator.feed(data[pos : pos + chunk])
            validator.close()
        assert (info.value.line, info.value.field) == (251, "messages[1].role")
        # The validator stays failed.
        with pytest.raises(FileValidationError):
            validator.close()


def test_line_longer_than_the_limit_is_refused():
    big = jsonl({"text": "x" * 5000})
    data = jsonl(SEED_CONVERSATION) + big + jsonl(SEED_CONVERSATION)
    for chunk in (100, 1 << 20):  # the long line arriving in pieces, and inside one chunk
        validator = JsonlValidator("conversations", filename="a", max_line_bytes=4096)
        with pytest.raises(FileValidationError) as info:
            for pos in range(0, len(data), chunk):
                validator.feed(data[pos : pos + chunk])
            validator.close()
        assert info.value.line == 2 and "longer than 4096 bytes" in info.value.message
    ok = JsonlValidator("conversations", filename="a", max_line_bytes=8192)
    ok.feed(data)
    assert ok.close() == 3


def test_raw_purpose_validator_ignores_content():
    validator = JsonlValidator("custom_job_file", filename="x")
    assert not validator.validates
    validator.feed(b"\xff\x00 anything")
    assert validator.close() == 0


def test_200k_rows_validate_fast_in_flat_memory(tmp_path: Path):
    row = json.dumps(
        {"messages": [msg("user", "What is the capital of France?"), msg("assistant", "Paris.")]}
    ).encode()
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        for _ in range(200):
            f.write((row + b"\n") * 1000)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        assert validate_jsonl(path, "conversations", filename="big.jsonl") == 200_000
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    # Flat memory: a few 1 MiB chunks, not the 20 MiB file. (tracemalloc slows Python ~5x,
    # hence the generous time bound; untraced this runs at ~200k rows/s.)
    assert peak < 16 << 20 and peak < size / 2, (peak, size)
    assert elapsed < 60, elapsed


# ---------------------------------------------------------------------------------------------
# Fitness for training (checked at `create` and again when a training job starts)


def _lines(*rows: object) -> list[bytes]:
    return jsonl(*rows).split(b"\n")


def test_rows_that_can_be_trained_on_pass_for_their_use():
    from openweights.testing import conversations_rows, preference_rows, weighted_rows
    from openweights.validation import validate_training_lines

    assert validate_training_lines(_lines(*conversations_rows(3)), "sft", filename="c") == 3
    assert validate_training_lines(_lines({"text": "plain"}), "sft", filename="t") == 1
    assert validate_training_lines(_lines(*weighted_rows(3)), "weighted_sft", filename="w") == 3
    assert validate_training_lines(_lines(*preference_rows(2)), "preference", filename="p") == 2


@pytest.mark.parametrize(
    "use, row, field, message",
    [
        ("sft", {"messages": [msg("user", "hi")]}, "messages", "no assistant message to train on"),
        (
            "weighted_sft",
            {"messages": [msg("user", "hi"), msg("assistant", [{"text": "x", "weight": 0}])]},
            "messages",
            "nothing to train on",
        ),
        (
            "weighted_sft",
            {"messages": [msg("user", [{"text": "x"}])]},  # a user block without weight: 0
            "messages",
            "nothing to train on",
        ),
        (
            "preference",
            {
                "prompt": [msg("user", "q")],
                "chosen": [msg("user", "a")],
                "rejected": [msg("assistant", "b")],
            },
            "chosen",
            "needs an assistant message",
        ),
        ("preference", {"prompt": [msg("user", "q")], "rejected": []}, "chosen", "required"),
    ],
)
def test_rows_with_nothing_to_train_on_name_file_line_and_field(use, row, field, message):
    from openweights.testing import conversations_rows, weighted_rows
    from openweights.validation import validate_training_lines

    good = {"sft": conversations_rows(1), "weighted_sft": weighted_rows(1)}.get(use) or [
        {
            "prompt": [msg("user", "q")],
            "chosen": [msg("assistant", "a")],
            "rejected": [msg("assistant", "b")],
        }
    ]
    with pytest.raises(FileValidationError) as info:
        validate_training_lines(_lines(good[0], row), use, filename="f.jsonl")
    e = info.value
    assert (e.filename, e.line, e.field) == ("f.jsonl", 2, field)
    assert message in e.message


def test_training_on_everything_accepts_rows_without_assistant_turns():
    from openweights.validation import validate_training_lines

    row = {"messages": [msg("user", "just text")]}
    assert validate_training_lines(_lines(row), "sft", filename="f", responses_only=False) == 1
    assert (
        validate_training_lines(_lines(row), "weighted_sft", filename="f", responses_only=False)
        == 1
    )


def test_iter_lines_splits_chunks_at_newlines_only():
    from openweights.validation import iter_lines

    assert list(iter_lines([b'{"a"', b": 1}\n{", b'"b": 2}'])) == [b'{"a": 1}', b'{"b": 2}']
