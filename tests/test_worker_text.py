"""Streaming text: incremental UTF-8 detokenization and stop strings (no model needed).

The decoder here is a byte-level one, like the GPT-2 family's: each id is one byte, and the text is
those bytes decoded as UTF-8 with "\ufffd" for an incomplete character. That is exactly the
situation the engine must handle for multi-byte characters split across tokens.
"""

from __future__ import annotations

import pytest

from smartspec.worker.sequence import OutputText, first_stop, longest_stop_prefix_suffix


def byte_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def stream(output: OutputText, pieces: list[list[int]]) -> tuple[str, list[int]]:
    text, tokens = "", []
    for piece in pieces:
        delta = output.extend(piece)
        text += delta.text
        tokens += delta.token_ids
        if output.stopped:
            break
    if not output.stopped:
        tail = output.flush()
        text += tail.text
        tokens += tail.token_ids
    return text, tokens


def test_multibyte_character_split_across_tokens_is_held_back_until_complete():
    output = OutputText(byte_decode)
    euro = ids("€")                      # 3 bytes
    assert output.extend(ids("a") + euro[:1]).text == "a"
    assert output.extend(euro[1:2]).text == ""          # still incomplete: nothing, not "\ufffd"
    delta = output.extend(euro[2:] + ids("b"))
    assert delta.text == "€b"
    assert "\ufffd" not in output.text


def test_streamed_pieces_concatenate_to_the_full_decode():
    text = "héllo wörld, ça va? 日本語 ok"
    pieces = [[b] for b in ids(text)]      # one byte per token: worst case for splitting
    streamed, tokens = stream(OutputText(byte_decode), pieces)
    assert streamed == text
    assert tokens == ids(text)


def test_stop_string_split_across_tokens_is_never_emitted():
    output = OutputText(byte_decode, stops=["STOP"])
    first = output.extend(ids("hello S"))
    assert first.text == "hello "                       # "S" could start the stop string
    second = output.extend(ids("TO"))
    assert second.text == ""
    third = output.extend(ids("P and more"))
    assert output.stopped
    assert third.text == ""
    assert output.text == "hello "
    # Token ids past the stop are dropped too; what was streamed equals what is kept.
    assert output.ids == ids("hello ")


def test_false_stop_prefix_is_released():
    output = OutputText(byte_decode, stops=["STOP"])
    streamed, _ = stream(output, [ids("a ST"), ids("AR b")])
    assert streamed == "a STAR b"
    assert not output.stopped


def test_held_back_prefix_is_flushed_at_the_end():
    output = OutputText(byte_decode, stops=["###"])
    assert output.extend(ids("done #")).text == "done "
    assert output.flush().text == "#"


def test_earliest_of_several_stop_strings_wins_inside_one_step():
    output = OutputText(byte_decode, stops=["world", "lo w"])
    streamed, tokens = stream(output, [ids("hel"), ids("lo world")])
    assert output.stopped
    assert streamed == "hel"
    assert byte_decode(tokens).startswith("hel")


def test_stop_keeps_only_tokens_needed_for_the_text_before_it():
    output = OutputText(byte_decode, stops=["X"])
    output.extend([ord("a"), ord("b"), ord("X"), ord("c"), ord("d")])
    assert output.stopped
    assert output.text == "ab"
    assert output.ids == [ord("a"), ord("b")]


def test_extend_after_stop_is_an_error():
    output = OutputText(byte_decode, stops=["."])
    output.extend(ids("end."))
    with pytest.raises(RuntimeError):
        output.extend(ids("more"))


@pytest.mark.parametrize(
    "text, stops, expected",
    [("abc", ["cde"], 1), ("abcd", ["cde"], 2), ("abc", ["xyz"], 0), ("aa", ["aab"], 2), ("abc", ["abc"], 0)],
)
def test_longest_stop_prefix_suffix(text, stops, expected):
    # "abc" with stop "abc" is 0: a complete stop string is found by first_stop, not held back.
    assert longest_stop_prefix_suffix(text, stops) == expected


def test_first_stop_respects_start():
    assert first_stop("a.b.c", ["."], 0) == 1
    assert first_stop("a.b.c", ["."], 2) == 3
    assert first_stop("abc", ["."], 0) == -1
