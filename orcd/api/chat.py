"""Chat prompts: the model's chat template rendered, and tokenized so that message text stays text.

A chat template is Jinja2 (GGUF ``tokenizer.chat_template``), rendered in an
:class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` with ``messages``,
``add_generation_prompt=True``, ``bos_token``, ``eos_token`` and ``raise_exception``.

What a user wrote must never become a control token: ``<start_of_turn>`` typed into a
message is text, not Gemma's turn marker. So the template is rendered with a unique mark in
place of each message's content, the rendered text is split on the marks, the template's own
parts are tokenized with special tokens parsed and the message parts without. Whitespace
around a message travels inside its mark, so a template that trims content (Gemma's does)
trims it as it would the real text.

Which template: the GGUF's own, if it has one that compiles. A GGUF without one is, as a
rule, a base model that was never trained on turn markers (the packaged Gemma 3 270M is
one: given Gemma's ``<start_of_turn>`` turns it repeats the question), so it gets a plain
transcript with no control tokens, ``User: ...`` / ``Assistant:``, and stops before it
writes the next ``User:`` turn itself.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn, Protocol

import attrs
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..engine import ModelInfo

TRANSCRIPT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# What a transcript turn starts with: the model is stopped before it writes the next one.
TRANSCRIPT_STOPS = ("\n\nUser:", "\nUser:")


class ChatTemplateError(Exception):
    """The template refused the conversation (``raise_exception``) or failed to render it."""


class Tokenizer(Protocol):
    """What rendering needs from an engine: :meth:`orcd.engine.BatchEngine.tokenize`."""

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = True) -> list[int]: ...


@attrs.frozen
class ChatMessage:
    role: str  # system | user | assistant (OpenAI's "developer" arrives as system)
    content: str


@attrs.frozen
class ChatPrompt:
    """A rendered conversation: its text (for logs and digests) and its tokens."""

    text: str
    tokens: list[int]
    parts: tuple[tuple[str, bool], ...]  # (text, is message text), in order


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    # As Hugging Face transformers compiles chat templates.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@attrs.frozen
class ChatTemplate:
    """One compiled chat template, with the model's BOS/EOS text and BOS policy."""

    name: str  # "gguf", or "transcript" (built in)
    source: str
    bos_text: str
    eos_text: str
    bos_id: int | None  # the token a BOS-adding model starts every prompt with
    _compiled: jinja2.Template = attrs.field(eq=False, repr=False)
    stop: tuple[str, ...] = ()  # stop sequences every chat with this template adds
    problem: str | None = None  # why the GGUF's own template is not used, if it is not

    @classmethod
    def for_model(cls, info: ModelInfo, tokenizer: Tokenizer) -> ChatTemplate:
        """The template to use for this model (see the module docstring for the choice)."""
        with_bos = tokenizer.tokenize("", special=True, add_bos=True)
        bos_id = with_bos[0] if with_bos else None
        # A token's text as llama-cpp-python returns it may carry its buffer's NUL padding.
        bos_text, eos_text = info.bos_text.split("\0")[0], info.eos_text.split("\0")[0]
        env = _environment()
        problem = None
        if info.chat_template:
            try:
                compiled = env.from_string(info.chat_template)
            except jinja2.TemplateError as exc:
                problem = f"the model's chat template does not compile: {exc}"
            else:
                return cls("gguf", info.chat_template, bos_text, eos_text, bos_id, compiled)
        return cls("transcript", TRANSCRIPT_TEMPLATE, bos_text, eos_text, bos_id,
                   env.from_string(TRANSCRIPT_TEMPLATE), TRANSCRIPT_STOPS, problem)

    def render(self, messages: Sequence[ChatMessage]) -> tuple[tuple[str, bool], ...]:
        """The rendered conversation as (text, is message text) parts."""
        nonce = secrets.token_hex(8)
        marks = []
        for i, message in enumerate(messages):
            core = message.content.strip()
            lead, trail = _edges(message.content, core)
            marks.append((lead, f"orcdmsg{nonce}n{i}x", core, trail))
        try:
            text = self._compiled.render(
                messages=[{"role": m.role, "content": lead + mark + trail}
                          for m, (lead, mark, _, trail) in zip(messages, marks, strict=True)],
                add_generation_prompt=True, bos_token=self.bos_text, eos_token=self.eos_text,
            )
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise ChatTemplateError(f"the chat template failed on these messages: {exc}") from None
        return _split(text, nonce, marks)


def _edges(content: str, core: str) -> tuple[str, str]:
    """The whitespace before and after ``core`` in ``content``."""
    if not core:
        return content, ""
    start = content.index(core)
    return content[:start], content[start + len(core):]


def _split(text: str, nonce: str, marks: list[tuple[str, str, str, str]]
           ) -> tuple[tuple[str, bool], ...]:
    parts: list[tuple[str, bool]] = []
    pieces = re.split(f"orcdmsg{nonce}n([0-9]+)x", text)
    # pieces: template, index, template, index, ..., template
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            parts.append((piece, False))
            continue
        lead, _, core, trail = marks[int(piece)]
        before, after = parts[-1][0], pieces[k + 1]
        # The mark's whitespace survived where the template kept it; it is message text.
        if lead and before.endswith(lead):
            before = before[: len(before) - len(lead)]
            core = lead + core
        if trail and after.startswith(trail):
            pieces[k + 1] = after[len(trail):]
            core = core + trail
        # A space the template wrote right before the message is tokenized with it
        # ("Assistant:" + " Paris"): SentencePiece and byte-level BPE vocabularies join a
        # word's leading space to the word, which is how the whole text tokenizes and how
        # the model writes its answers, so an answer sent back in the next turn has the
        # tokens the model generated (and its positions come from the prefix cache).
        if core and before.endswith(" "):
            before, core = before[:-1], " " + core
        parts[-1] = (before, False)
        parts.append((core, True))
    if any(nonce in t for t, is_message in parts if not is_message):
        raise ChatTemplateError(
            "the chat template alters message text, so it cannot be kept apart from the "
            "template's own control tokens")
    return tuple((t, m) for t, m in parts if t)


def tokenize_chat(template: ChatTemplate, messages: Sequence[ChatMessage],
                  tokenizer: Tokenizer) -> ChatPrompt:
    """Render ``messages`` and tokenize them; message text is never parsed for special tokens.

    The template emits BOS itself where it wants one; a model that adds BOS gets exactly
    one, whether or not the template wrote it. A space that ends the template's text right
    before a message is part of the message (see :func:`_split`).
    """
    parts = template.render(messages)
    tokens: list[int] = []
    for text, is_message in parts:
        tokens += tokenizer.tokenize(text, special=not is_message, add_bos=False)
    bos = template.bos_id
    if bos is not None:
        if not tokens or tokens[0] != bos:
            tokens.insert(0, bos)
        while len(tokens) > 1 and tokens[1] == bos:
            del tokens[1]
    return ChatPrompt("".join(t for t, _ in parts), tokens, parts)


def content_text(content: Any) -> str | None:
    """OpenAI message content as one string: a string, or the text of ``text`` parts.

    None when it is neither (an image part, a wrong type).
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                return None
            texts.append(part["text"])
        return "\n".join(texts)
    return None
