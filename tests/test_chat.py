"""Chat messages as token deltas: appending turn by turn gives exactly the tokens of rendering
the whole conversation at once, for the byte tokenizer and a ChatML Hugging Face template."""
import pytest
from test_tokenizer import _build_tokenizer_dir

from services.session.chat import ChatFormatter
from workers.tokenizer import ByteTokenizer, ChatFormatError, load_tokenizer

TURNS = [
    [{"role": "system", "content": "You are helpful."}],
    [{"role": "user", "content": "hello world"}],
    [{"role": "tool", "content": '{"result": 4}'}, {"role": "user", "content": "how are you today?"}],
]


@pytest.fixture(params=["byte", "hf"])
def tokenizer(request, tmp_path):
    if request.param == "byte":
        return ByteTokenizer(512)
    return load_tokenizer(_build_tokenizer_dir(tmp_path / "tok"))


def test_deltas_add_up_to_the_whole_conversation(tokenizer):
    chat = ChatFormatter(tokenizer)
    history, tokens = [], []
    for new in TURNS:
        tokens += chat.delta(history, new, add_generation_prompt=False)
        history += new
        assert tokens == tokenizer.apply_chat_template(history, add_generation_prompt=False)
    tokens += chat.delta(history, [], add_generation_prompt=True)
    assert tokens == tokenizer.apply_chat_template(history, add_generation_prompt=True)


def test_closing_an_assistant_turn(tokenizer):
    chat = ChatFormatter(tokenizer)
    history = TURNS[0] + TURNS[1]
    reply = "It is 4."
    full = tokenizer.apply_chat_template(history + [{"role": "assistant", "content": reply}],
                                         add_generation_prompt=False)
    prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True)
    turn = full[len(prompt):]  # the reply's tokens and the template's end of turn
    content = turn[:len(tokenizer.encode(reply))]
    assert content == tokenizer.encode(reply)
    # Stopped at max_tokens, before the end of turn: the end of turn is added.
    assert content + chat.close_assistant(history, content, reply) == turn
    # Stopped at the end-of-turn token: only what the template puts after it (if anything).
    eos_out = turn[:len(content) + 1]
    assert eos_out + chat.close_assistant(history, eos_out, reply) == turn


def test_bad_messages_are_refused(tokenizer):
    chat = ChatFormatter(tokenizer)
    with pytest.raises(ChatFormatError, match="role"):
        chat.delta([], [{"role": "wizard", "content": "x"}], False)
    with pytest.raises(ChatFormatError, match="content"):
        chat.delta([], [{"role": "user", "content": None}], False)


def test_the_end_of_turn_follows_ids_that_do_not_round_trip(tmp_path):
    """Generated ids stay as they are and the template's end of turn always follows them, also
    when decoding and re-encoding them gives other ids (here a lone byte of a character)."""
    tok = load_tokenizer(_build_tokenizer_dir(tmp_path / "tok"))
    chat = ChatFormatter(tok)
    history = TURNS[0] + TURNS[1]
    end_of_turn = tok.encode("<|im_end|>\n")
    output = tok.encode("hello") + tok.encode("é")[:1]  # stopped inside a two-byte character
    text = tok.decode(output)
    assert tok.encode(text) != output
    assert chat.close_assistant(history, output, text) == end_of_turn
    stopped = output + end_of_turn[:1]  # stopped at <|im_end|>: only what follows it
    assert chat.close_assistant(history, stopped, text) == end_of_turn[1:]
