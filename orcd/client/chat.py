"""``orcd chat``: an interactive chat over ``POST /v1/chat/completions`` (stream=true).

The conversation is kept here and sent whole with every question. Each answer is a job
whose id the client picks (``X-Job-Id``), so Ctrl-C during an answer cancels that answer
only (``POST /cancel``) and the chat goes on; the cancelled exchange is dropped from the
conversation. Ctrl-C at the prompt clears the line; Ctrl-D or ``/exit`` quits.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TextIO

from .api import Api, ClientError, Event, openai_events
from .follow import follow
from .term import Style, ms, printable

HELP = "Ctrl-C stops an answer · /reset forgets the conversation · Ctrl-D or /exit quits"


class ChatView:
    """Streams one answer to the terminal."""

    def __init__(self, out: TextIO, style: Style) -> None:
        self.out = out
        self.s = style
        self.text: list[str] = []

    def show(self, event: Event) -> None:
        if event.name == "token":
            piece = str(event.data.get("t", ""))
            self.text.append(piece)
            self.out.write(printable(piece) if self.s.tty else piece)
            self.out.flush()
        elif event.terminal and self.text and not self.text[-1].endswith("\n"):
            self.out.write("\n")
            self.out.flush()


@contextmanager
def _completion(api: Api, body: dict[str, Any], job_id: str) -> Iterator[Iterator[Event]]:
    with api.stream("/v1/chat/completions", body, headers={"X-Job-Id": job_id}) as lines:
        yield openai_events(lines)


def _served_model(api: Api) -> str:
    try:
        models = api.request("GET", "/v1/models").get("data") or []
    except ClientError as exc:
        if exc.status == 404:
            raise ClientError(f"{api.url} has no OpenAI-compatible API "
                              "(GET /v1/models answered 404)") from None
        raise
    if not models or not isinstance(models[0], dict) or "id" not in models[0]:
        raise ClientError(f"{api.url}/v1/models lists no model")
    return str(models[0]["id"])


def chat(api: Api, control: Api, options: dict[str, Any], *, system: str | None,
         model: str | None, read_line: Callable[[str], str], out: TextIO,
         no_color: bool = False) -> int:
    """The chat loop; ``options`` (max_tokens, temperature, seed) go into every request."""
    s = Style(out, no_color=no_color)
    model = model or _served_model(api)
    start = [{"role": "system", "content": system}] if system else []
    messages: list[dict[str, str]] = list(start)
    session = secrets.token_hex(3)
    # \001 and \002 tell readline that the colour codes take no room on the line.
    prompt = "\001\x1b[1;36m\002you>\001\x1b[0m\002 " if s.on else "you> "
    out.write(s.dim(f"orcd chat · {model} at {api.url}") + "\n" + s.dim(HELP) + "\n")
    out.flush()
    turn = 0
    while True:
        try:
            line = read_line(prompt)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            continue
        question = line.strip()
        if not question:
            continue
        if question in ("/exit", "/quit"):
            return 0
        if question == "/reset":
            messages = list(start)
            out.write(s.dim("(conversation cleared)") + "\n")
            continue
        if question == "/help":
            out.write(s.dim(HELP) + "\n")
            continue
        turn += 1
        job_id = f"chat-{session}-{turn}"
        body = {"model": model, "messages": [*messages, {"role": "user", "content": question}],
                "stream": True, **options}
        view = ChatView(out, s)
        try:
            finished = follow(partial(_completion, api, body, job_id),
                              partial(control.cancel, job_id), view)
        except ClientError as exc:
            out.write(s.red(f"error: {exc.message}") + "\n")
            continue
        event = finished.event
        if event.name == "end":
            messages = [*body["messages"], {"role": "assistant", "content": "".join(view.text)}]
        elif finished.cancelled_by_us:
            latency = finished.cancel_latency_ms
            assert latency is not None
            out.write(s.yellow(f"answer cancelled in {ms(latency)}")
                      + s.dim(" (not kept in the conversation)") + "\n")
        else:
            out.write(s.red(f"error: {event.data.get('code')}: {event.data.get('message')}")
                      + "\n")
        out.flush()
