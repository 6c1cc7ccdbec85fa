"""Tokenizers: the built-in byte tokenizer and tokenizer.json ones (built in-test, no download)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.tokenizer import ByteTokenizer, ChatFormatError, HFTokenizer, IncrementalDecoder, Tokenizer, load_tokenizer

TEXTS = ["", "hello world", "héllo wörld — 日本語 🚀 ∑x²", "tab\tnew\nline \x00 nul", "<|user|> not special"]

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('bad role ' + message['role']) }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": "Hello there, what is 2+2?"},
            {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "Und auf Deutsch? ü"}]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_specials_and_chat():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer) and isinstance(load_tokenizer(None), ByteTokenizer)
    assert tok.vocab_size <= 512 and len(set(tok.special_ids.values())) == len(tok.SPECIALS)
    s = tok.special_ids
    ids = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hé"}])
    assert ids == ([tok.bos_token_id, s["<|system|>"]] + list(b"be brief") + [s["<|end|>"], s["<|user|>"]]
                   + list("hé".encode()) + [s["<|end|>"], s["<|assistant|>"]])
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False)[-1] == s["<|end|>"]
    assert tok.decode(ids) == "be briefhé"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos><|system|>be brief<|end|><|user|>hé<|end|><|assistant|>"
    assert s["<|end|>"] in tok.eos_token_ids and tok.eos_token_id in tok.eos_token_ids
    # A multi-byte character split across the end decodes without raising.
    assert tok.decode(list("日".encode())[:2]) == "\ufffd"
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        tok.apply_chat_template([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="vocabulary"):
        tok.decode([999])
    padded = ByteTokenizer(512)  # a model vocabulary padded past the byte tokenizer's
    assert padded.decode([104, 300, 105]) == "hi"
    assert padded.decode([300], skip_special_tokens=False) == "<|reserved_300|>"
    with pytest.raises(ValueError, match="vocabulary"):
        padded.decode([512])


def test_incremental_decoder_never_splits_a_character():
    tok = ByteTokenizer()
    text = "héllo 日本語 🚀!"
    dec = IncrementalDecoder(tok.decode)
    deltas = [dec.push(i) for i in tok.encode(text)]
    assert deltas[:4] == ["h", "", "é", "l"]  # "é" is two bytes: nothing until both are in
    assert "".join(deltas) == text and dec.flush() == ""
    dec.push(list("日".encode())[0])
    assert dec.flush() == "\ufffd"  # an incomplete character at the end comes out on flush


def _build_tokenizer_dir(path: Path, template: str | None = CHATML) -> Path:
    from tokenizers import Tokenizer as Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["hello world, how are you today?", "the quick brown fox jumps over the lazy dog",
              "You are helpful. What is 2+2? It is 4.", "system user assistant"] * 20
    tok.train_from_iterator(corpus, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": None,
           "pad_token": "<|endoftext|>"}
    if template is not None:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return path


def test_hf_tokenizer(tmp_path):
    d = _build_tokenizer_dir(tmp_path / "tok")
    tok = load_tokenizer(d)
    assert isinstance(tok, HFTokenizer)
    im_end = tok._tok.token_to_id("<|im_end|>")
    assert tok.eos_token_ids == (im_end, 0)  # eos_token, then generation_config extras (deduplicated)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.apply_chat_template(MESSAGES)
    rendered = tok.render_chat(MESSAGES)
    assert rendered.startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHello")
    assert rendered.endswith("<|im_start|>assistant\n")
    # The template's text with its specials as single tokens (the text between them is
    # encoded on its own: a special ends a pre-token).
    start, end = tok._tok.token_to_id("<|im_start|>"), tok._tok.token_to_id("<|im_end|>")
    expected = []
    for role, content in [("system", "You are helpful.")] + [(m["role"], m["content"]) for m in MESSAGES]:
        expected += [start, *tok.encode(f"{role}\n{content}"), end, *tok.encode("\n")]
    expected += [start, *tok.encode("assistant\n")]
    assert ids == expected
    no_prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert ids[:len(no_prompt)] == no_prompt and len(ids) > len(no_prompt)
    with pytest.raises(ChatFormatError, match="role must be one of"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])
    refusing = HFTokenizer(tok._tok, chat_template="{{ raise_exception('no ' + messages[0]['role']) }}")
    with pytest.raises(Exception, match="no tool"):  # a template's own raise_exception
        refusing.apply_chat_template([{"role": "tool", "content": "x"}])
    for text in TEXTS:  # word-leading spaces survive decoding one token at a time
        dec = IncrementalDecoder(tok.decode)
        assert "".join(dec.push(i) for i in tok.encode(text)) + dec.flush() == text


def test_no_token_covers_more_than_max_chars_per_token(tmp_path):
    texts = TEXTS + ["the quick brown fox jumps over the lazy dog " * 40, "hello world" * 50, "x" * 1000]
    for tok in (ByteTokenizer(), HFTokenizer.from_dir(_build_tokenizer_dir(tmp_path / "tok"))):
        assert tok.max_chars_per_token >= 1
        for text in texts:  # the service's refusal of untokenized text rests on this bound
            assert len(tok.encode(text)) * tok.max_chars_per_token >= len(text), text[:40]


def test_hf_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = _build_tokenizer_dir(tmp_path / "tok")
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    out = ref.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ref_ids = out["input_ids"] if not isinstance(out, list) else out
    assert HFTokenizer.from_dir(d).apply_chat_template(MESSAGES) == list(ref_ids)
    # transformers 5 saves the template as chat_template.jinja: read that layout too.
    ref.save_pretrained(tmp_path / "saved")
    saved = HFTokenizer.from_dir(tmp_path / "saved")
    assert saved.chat_template is not None
    assert saved.apply_chat_template(MESSAGES) == list(ref_ids)


def test_hf_tokenizer_fallback_and_errors(tmp_path):
    d = _build_tokenizer_dir(tmp_path / "plain", template=None)
    tok = HFTokenizer.from_dir(d)
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert text == "user: hi\nassistant:"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids == tok.encode("user: hi\n") + tok.encode("assistant:")  # no BOS: the config has none
    assert tok.decode(ids) == text
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
