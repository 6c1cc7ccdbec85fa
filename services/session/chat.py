"""Chat messages to token deltas: what a session's next messages add to its history.

A session's history is token ids, the unit of KV reuse: every turn appends to it and never
re-tokenizes what came before, so the prefix hashes of earlier turns stay valid. Chat
templates, however, render whole conversations. ``ChatFormatter`` renders the conversation
with and without the new messages and keeps the difference (as text for tokenizers with a
template, as ids for the byte tokenizer), which is exactly what the template adds for them.
"""
from __future__ import annotations

from workers.tokenizer import ChatFormatError, Tokenizer, check_messages


class ChatFormatter:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._render = getattr(tokenizer, "render_chat", None)  # text templates (Hugging Face)

    def delta(self, history: list[dict], new: list[dict], add_generation_prompt: bool) -> list[int]:
        """Token ids that ``new`` messages (and the generation prompt) add after ``history``."""
        check_messages(new)
        try:
            if self._render is not None:
                before = self._render(history, add_generation_prompt=False) if history else ""
                after = self._render(history + new, add_generation_prompt=add_generation_prompt)
                if not after.startswith(before):  # a template that rewrites earlier turns
                    before = ""
                    after = self._render(new, add_generation_prompt=add_generation_prompt)
                return self.tokenizer.encode(after[len(before):])
            before_ids = self.tokenizer.apply_chat_template(history, add_generation_prompt=False) if history else []
            after_ids = self.tokenizer.apply_chat_template(history + new, add_generation_prompt=add_generation_prompt)
        except (ValueError, TypeError) as e:
            raise ChatFormatError(str(e)) from e
        except Exception as e:  # jinja2 TemplateError and friends
            raise ChatFormatError(f"the chat template failed: {e}") from e
        if after_ids[:len(before_ids)] != before_ids:
            return after_ids
        return after_ids[len(before_ids):]

    def close_assistant(self, history: list[dict], output: list[int], text: str) -> list[int]:
        """Tokens that end an assistant turn whose generated ``output`` (decoded: ``text``)
        did not reach the template's end-of-turn (e.g. it stopped at max_tokens, or the
        template adds a newline after the end token)."""
        try:
            full = self.delta(history, [{"role": "assistant", "content": text}], add_generation_prompt=False)
            opened = self.delta(history, [], add_generation_prompt=True)
        except ChatFormatError:
            return []
        if full[:len(opened)] != opened:
            return []
        closing = full[len(opened):]  # content + the template's end of turn
        if closing[:len(output)] == output:
            return closing[len(output):]
        # The template's tokenization of the content differs from what was generated; the
        # history keeps the generated tokens as they are and the next message follows them.
        return []
