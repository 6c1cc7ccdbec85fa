"""Tokenizers: a built-in byte tokenizer (no files) and Hugging Face ``tokenizer.json`` ones.

Both turn chat messages into token ids with ``apply_chat_template``. Plain ``encode`` never
adds special tokens and never parses special-token text inside user content (a user typing
"<|assistant|>" gets bytes, not a role switch).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path


class Tokenizer:
    """What the engine needs from a tokenizer."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # No token covers more input characters: n characters are at least n / this many tokens,
    # so an input far over a limit is refused before it is tokenized.
    max_chars_per_token: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        raise NotImplementedError


class IncrementalDecoder:
    """Text deltas for a growing list of token ids that never split a UTF-8 character or
    drop a word-leading space, decoding only a small window of ids per token (as vLLM does):
    the deltas joined are the decoded whole."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # the window starts here: decoding from a token boundary keeps spaces
        self._read = 0  # ids up to here are emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # not in the middle of a character
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is left (possibly an incomplete character) at the end of the stream."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]


ROLES = ("system", "user", "assistant", "tool")


class ChatFormatError(ValueError):
    """Messages a chat template cannot render (not a list of messages, unknown role, bad content)."""


def check_messages(messages: list[dict]) -> None:
    """Raise ``ChatFormatError`` unless ``messages`` is a list of {"role": one of ROLES,
    "content": str}."""
    if not isinstance(messages, list):
        raise ChatFormatError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ChatFormatError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(m.get("content"), str):
            raise ChatFormatError(f"message {i}: content must be a string")


class ByteTokenizer(Tokenizer):
    """ids 0..255 are UTF-8 bytes; specials follow. Chat format::

        <bos><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>")

    def __init__(self, vocab_size: int | None = None) -> None:
        self.special_ids = {name: 256 + i for i, name in enumerate(self.SPECIALS)}
        self.special_names = {i: name for name, i in self.special_ids.items()}
        # A model's vocabulary may be padded past the byte tokenizer's (the built-in models
        # have 512): the extra ids are reserved specials, so sampling one never breaks decoding.
        self.vocab_size = max(256 + len(self.SPECIALS), vocab_size or 0)
        self.pad_token_id = self.special_ids["<pad>"]
        self.bos_token_id = self.special_ids["<bos>"]
        self.eos_token_id = self.special_ids["<eos>"]
        self.end_token_id = self.special_ids["<|end|>"]
        self.eos_token_ids = (self.eos_token_id, self.end_token_id)
        self.max_chars_per_token = 1  # a character is at least one byte

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the byte tokenizer's vocabulary ({self.vocab_size})")
            if not skip_special_tokens:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                out.append(self.special_names.get(i, f"<|reserved_{i}|>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        check_messages(messages)
        ids = [self.bos_token_id]
        for m in messages:
            ids.append(self.special_ids[f"<|{m['role']}|>"])
            ids.extend(self.encode(m["content"]))
            ids.append(self.end_token_id)
        if add_generation_prompt:
            ids.append(self.special_ids["<|assistant|>"])
        return ids


def _token_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` (through ``tokenizers``) plus the chat template, when present, from
    ``tokenizer_config.json`` / ``chat_template.jinja`` / ``chat_template.json``, rendered with
    jinja2 in a sandbox the way transformers does."""

    def __init__(self, tokenizer, chat_template: str | None = None, bos_token: str | None = None,
                 eos_tokens: tuple[str, ...] = (), extra_eos_ids: tuple[int, ...] = ()):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token = bos_token
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        eos = [tokenizer.token_to_id(t) for t in eos_tokens]
        eos += list(extra_eos_ids)
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos if i is not None))
        # The longest vocabulary entry (byte-level entries: one character per byte), times 4
        # for normalizers that fold several characters into one (NFC, NFKC).
        self.max_chars_per_token = 4 * max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)
        self._template = None

    @classmethod
    def from_dir(cls, path: str | Path) -> "HFTokenizer":
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json is missing (only fast tokenizers are supported)")
        tokenizer = _Tok.from_file(str(tok_file))
        cfg = _read_json(path / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif template is None and (path / "chat_template.json").is_file():
            template = _read_json(path / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        eos_tokens = tuple(t for t in [_token_text(cfg.get("eos_token"))] if t)
        extra: list[int] = []
        for name in ("generation_config.json", "config.json"):
            value = _read_json(path / name).get("eos_token_id")
            if value is not None:
                extra.extend(value if isinstance(value, list) else [value])
        return cls(tokenizer, template, _token_text(cfg.get("bos_token")), eos_tokens, tuple(extra))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        check_messages(messages)
        if self.chat_template is None:
            # Plain fallback for tokenizers without a template.
            text = "".join(f"{m['role']}: {m.get('content', '')}\n" for m in messages)
            if add_generation_prompt:
                text += "assistant:"
            return (self.bos_token or "") + text
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs,
        )

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes the special tokens itself (as transformers does: no extra BOS).
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _compile_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def load_tokenizer(path: str | Path | None = None, vocab_size: int | None = None) -> Tokenizer:
    """``None`` -> the built-in :class:`ByteTokenizer` (padded to ``vocab_size``); a directory
    with tokenizer.json -> HF."""
    if path is None:
        return ByteTokenizer(vocab_size)
    return HFTokenizer.from_dir(path)
