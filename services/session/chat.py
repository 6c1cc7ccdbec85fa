"""Chat messages to token deltas: what a session's next messages add to its history.

A session's history is token ids, the unit of KV reuse: every turn appends to it and never
re-tokenizes what came before, so the prefix hashes of earlier turns stay valid. Chat
templates, however, render whole conversations. ``ChatFormatter`` renders the conversation
with and without the new messages and keeps the difference (as text for tokenizers with a
template, as ids for the byte tokenizer), which is exactly what the template adds for them.
"""
from __future__ import annotations

import logging

from workers.tokenizer import ChatFormatError, Tokenizer, check_messages

logger = logging.getLogger(__name__)


class ChatFormatter:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._render = getattr(tokenizer, "render_chat", None)  # text templates (Hugging Face)

    def _template(self, messages: list[dict], add_generation_prompt: bool) -> str | list[int]:
        """The conversation rendered: text (a tokenizer with a text template) or ids."""
        try:
            if self._render is not None:
                return self._render(messages, add_generation_prompt=add_generation_prompt) if messages else ""
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) \
                if messages else []
        except (ValueError, TypeError) as e:
            raise ChatFormatError(str(e)) from e
        except Exception as e:  # jinja2 TemplateError and friends
            raise ChatFormatError(f"the chat template failed: {e}") from e

    def delta(self, history: list[dict], new: list[dict], add_generation_prompt: bool) -> list[int]:
        """Token ids that ``new`` messages (and the generation prompt) add after ``history``."""
        check_messages(new)
        before = self._template(history, False)
        after = self._template(history + new, add_generation_prompt)
        if after[:len(before)] != before:  # a template that rewrites earlier turns
            if self._render is None:
                return after
            before, after = "", self._template(new, add_generation_prompt)
        rest = after[len(before):]
        return self.tokenizer.encode(rest) if isinstance(rest, str) else rest

    def close_assistant(self, history: list[dict], output: list[int], text: str) -> list[int]:
        """The tokens that follow a generated assistant reply ``output`` (decoded: ``text``)
        in the history: what the template renders after an assistant reply's content (its
        end of turn, e.g. ``<|im_end|>\\n``), always. The output itself stays as generated (its
        KV exists), even where encoding ``text`` gives other ids (a lone byte of a multi-byte
        character, a special token); an output that stopped at an end-of-turn token gets what
        the template puts after that token."""
        closing = self._closing(history, text)
        if output and output[-1] in self.tokenizer.eos_token_ids and output[-1] in closing:
            return closing[closing.index(output[-1]) + 1:]
        return closing

    def _closing(self, history: list[dict], text: str) -> list[int]:
        try:
            opened = self._template(history, True)
            # The reply's own text, else a plain one for templates that rewrite content (e.g. trim it).
            for content in (text, "x"):
                full = self._template(history + [{"role": "assistant", "content": content}], False)
                body = opened + (content if isinstance(opened, str) else self.tokenizer.encode(content))
                if full[:len(body)] == body:
                    rest = full[len(body):]
                    return self.tokenizer.encode(rest) if isinstance(rest, str) else rest
        except ChatFormatError as e:  # the turn is generated already: record it as it is
            logger.warning("the chat template cannot render the assistant reply: %s", e)
            return []
        logger.warning("the chat template renders an assistant reply unlike its generation prompt; the turn "
                       "is recorded without end-of-turn tokens")
        return []
