"""The OpenAI-compatible API (/v1), driven by the real ``openai`` SDK over real sockets.

The tiny model gets Gemma's chat template in its GGUF metadata (``chat_model``), so the
template path is the one a real model takes; the packaged Gemma model, which ships without
a template, is covered under the ``gemma`` marker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import httpx
import openai
import pytest
import trio
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from orcd.api.chat import ChatMessage, ChatTemplate, tokenize_chat

from .conftest import LogCapture
from .harness import Gate, Harness, running_worker

# The SDK stops reading a stream at "data: [DONE]" and leaves its byte generators to the GC.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Async generator '(httpx2|httpcore2|openai)\\..*' was garbage collected:ResourceWarning")

BOS = 1  # the tiny model's BOS, "<s>"
HELLO = [{"role": "user", "content": "Hello there"}]
MODEL = "tiny-chat"  # the /v1 model id: the GGUF file name without .gguf

# Gemma 3's chat template, as Google publishes it with the instruction-tuned models.
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""


def with_chat_template(model: Path, out: Path, template: str) -> Path:
    """A copy of ``model`` with ``template`` as its GGUF ``tokenizer.chat_template``."""
    reader = gguf.GGUFReader(model)
    writer = gguf.GGUFWriter(out, arch=reader.fields["general.architecture"].contents())
    value = MetadataDetails(gguf.GGUFValueType.STRING, template)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: value}, [])
    return out


@pytest.fixture(scope="session")
def chat_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with Gemma's chat template in its GGUF metadata."""
    return with_chat_template(tiny_model, tmp_path_factory.mktemp("chat") / "tiny-chat.gguf",
                              GEMMA_TEMPLATE)


def sync_client(h: Harness, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{h.worker.uri}/v1", api_key="unused", **kw)


def async_client(h: Harness, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{h.worker.uri}/v1", api_key="unused", **kw)


async def wait_cancel_requested(h: Harness, job_id: str) -> None:
    with trio.fail_after(10):
        while (job := h.worker.registry.get(job_id)) is None or job.cancel_reason is None:
            await trio.sleep(0.005)


def joined(events: list[Any]) -> str:
    return "".join(e.data["t"] for e in events if e.name == "token")


# -- requests that complete -----------------------------------------------------------------


async def test_models_lists_the_one_model(chat_model: Path) -> None:
    async with running_worker(chat_model) as h:
        with sync_client(h) as client:
            models = await trio.to_thread.run_sync(client.models.list)
            assert [m.id for m in models.data] == [MODEL]
            model = await trio.to_thread.run_sync(client.models.retrieve, MODEL)
            assert model.owned_by == "orcd"


async def test_chat_uses_the_template_and_is_a_job(chat_model: Path) -> None:
    async with running_worker(chat_model) as h:
        async with async_client(h) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=HELLO, max_tokens=12, temperature=0, seed=7,
                extra_headers={"X-Job-Id": "chat-1"})
        reply = raw.parse()
        assert raw.headers["X-Job-Id"] == "chat-1" and reply.id == "chat-1"
        assert reply.object == "chat.completion" and reply.model == MODEL
        choice = reply.choices[0]
        assert choice.message.role == "assistant" and choice.message.content
        assert choice.finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == 12
        assert (await h.job("chat-1"))["state"] == "completed"
        # The same tokens through the native API: the chat was rendered with the template.
        prompt = "<start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\n"
        events = await h.execute(job_id="native-1", prompt=prompt, max_tokens=12,
                                 temperature=0, seed=7)
        started = next(e for e in events if e.name == "started")
        assert started.data["prompt_tokens"] == reply.usage.prompt_tokens
        assert joined(events).lstrip() == choice.message.content  # a reply starts with no blank


async def test_chat_streaming_with_usage(chat_model: Path) -> None:
    async with running_worker(chat_model) as h:
        async with async_client(h) as client:
            whole = await client.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=10, temperature=0, seed=3)
            stream = await client.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=10, temperature=0, seed=3, stream=True,
                stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finish[-1] == "length" and not any(finish[:-1])
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage is not None
        assert usage.completion_tokens == 10 and usage == whole.usage
        assert all(c.usage is None for c in chunks[:-1])
        assert (await h.job(chunks[0].id))["state"] == "completed"


async def test_stream_frames_are_data_only_and_end_with_done(chat_model: Path) -> None:
    async with running_worker(chat_model) as h:
        body = {"messages": HELLO, "max_tokens": 4, "stream": True}  # no model: allowed
        async with h.client.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in resp.aiter_lines() if line]
        assert all(line.startswith("data: ") for line in lines), lines
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert "usage" not in chunks[-1]  # not asked for


async def test_completions_with_a_stop_sequence(chat_model: Path) -> None:
    async with running_worker(chat_model) as h:
        async with async_client(h) as client:
            free = await client.completions.create(
                model=MODEL, prompt="Once upon", max_tokens=20, temperature=0, seed=1)
            text = free.choices[0].text
            assert free.id.startswith("cmpl-") and free.choices[0].finish_reason == "length"
            stop = text[5:7]
            stopped = await client.completions.create(
                model=MODEL, prompt="Once upon", max_tokens=20, temperature=0, seed=1, stop=stop)
            assert stopped.choices[0].finish_reason == "stop"
            assert stopped.choices[0].text == text[: text.index(stop)]
            stream = await client.completions.create(
                model=MODEL, prompt="Once upon", max_tokens=20, temperature=0, seed=1,
                stream=True)
            streamed = [c async for c in stream]
        assert "".join(c.choices[0].text for c in streamed) == text
        assert streamed[-1].choices[0].finish_reason == "length"


async def test_sync_client_in_a_thread(chat_model: Path) -> None:
    async with running_worker(chat_model) as h:
        with sync_client(h) as client:

            def run() -> list[str]:
                stream = client.chat.completions.create(
                    model=MODEL, messages=HELLO, max_tokens=5, stream=True, user="u1")
                return [c.choices[0].delta.content or "" for c in stream if c.choices]

            pieces = await trio.to_thread.run_sync(run)
        assert "".join(pieces)


# -- templates, and message text that stays text ------------------------------------------


async def test_special_token_text_in_a_message_is_tokenized_as_text(chat_model: Path) -> None:
    async with running_worker(chat_model) as h:
        engine = h.engine
        template = ChatTemplate.for_model(engine.info, engine)
        assert template.name == "gguf" and template.bos_id == BOS
        prompt = tokenize_chat(template, [ChatMessage("user", "  <s>hi</s> \n")], engine)
        # The template writes "<s>" (BOS) itself: one BOS, not a second one added on top.
        assert prompt.tokens.count(BOS) == 1 and prompt.tokens[0] == BOS
        as_text = engine.tokenize("<s>hi</s>", special=False, add_bos=False)
        assert len(as_text) == 9  # nine characters, no control token
        n = len(as_text)
        assert any(prompt.tokens[i:i + n] == as_text for i in range(len(prompt.tokens)))
        assert 2 not in prompt.tokens  # "</s>" stayed text, not EOS
        assert prompt.text.endswith("<start_of_turn>user\n<s>hi</s><end_of_turn>\n"
                                    "<start_of_turn>model\n")  # trimmed, as Gemma's does
        async with async_client(h) as client:

            async def prompt_tokens(content: str) -> int:
                reply = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=1)
                assert reply.usage is not None
                return reply.usage.prompt_tokens

            assert await prompt_tokens("<s>") == await prompt_tokens("abc")


async def test_a_template_that_refuses_the_conversation_is_a_400(chat_model: Path) -> None:
    async with running_worker(chat_model) as h:
        async with async_client(h, max_retries=0) as client:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(model=MODEL, messages=HELLO + HELLO)
        assert "roles must alternate" in caught.value.message
        assert caught.value.param == "messages"


async def test_a_model_without_a_template_gets_a_plain_transcript(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        template = ChatTemplate.for_model(h.engine.info, h.engine)
        assert template.name == "transcript" and template.stop == ("\n\nUser:", "\nUser:")
        async with async_client(h) as client:
            reply = await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                max_tokens=6, temperature=0, seed=2)
        events = await h.execute(job_id="plain", prompt="System: Be brief.\n\nUser: Hi\n\n"
                                 "Assistant:", max_tokens=6, temperature=0, seed=2,
                                 stop=list(template.stop))
        assert joined(events).lstrip() == reply.choices[0].message.content


async def test_a_template_that_does_not_compile_falls_back_to_the_transcript(
        tiny_model: Path, tmp_path: Path, log_capture: LogCapture) -> None:
    broken = with_chat_template(tiny_model, tmp_path / "broken.gguf", "{% for m in %}")
    async with running_worker(broken) as h:
        async with async_client(h) as client:
            reply = await client.chat.completions.create(model="broken", messages=HELLO,
                                                         max_tokens=3)
        assert reply.choices[0].finish_reason in ("length", "stop")
        [line] = log_capture.actions("chat_template")
        assert line["template"] == "transcript" and line["level"] == "warning"
        assert "does not compile" in line["human"]


# -- cancellation ----------------------------------------------------------------------------


async def test_closing_the_stream_cancels_the_job(chat_model: Path) -> None:
    async with running_worker(chat_model) as h:
        h.engine.at_token[3] = gate = Gate()
        async with async_client(h) as client:
            stream = await client.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=200, stream=True,
                extra_headers={"X-Job-Id": "gone"})
            first = await stream.__anext__()
            assert first.choices[0].delta.role == "assistant"
            await gate.wait_reached()
            await stream.close()
            await wait_cancel_requested(h, "gone")
            gate.open()
            job = await h.wait_state("gone", "cancelled")
            assert job["cancel_reason"] == "client_disconnect"
            with trio.fail_after(10):  # the slot is free again: the next request runs at once
                nxt = await client.chat.completions.create(model=MODEL, messages=HELLO,
                                                           max_tokens=3)
        assert nxt.choices[0].finish_reason == "length"


async def test_disconnect_while_waiting_for_a_whole_response_cancels(chat_model: Path) -> None:
    async with running_worker(chat_model) as h:
        h.engine.at_token[2] = gate = Gate()
        async with async_client(h, max_retries=0) as client:
            with trio.move_on_after(30) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: client.chat.completions.create(
                        model=MODEL, messages=HELLO, max_tokens=200,
                        extra_headers={"X-Job-Id": "left"}))
                    await gate.wait_reached()
                    nursery.cancel_scope.cancel()  # the client gives up and closes its socket
            assert not scope.cancelled_caught
            await wait_cancel_requested(h, "left")
            gate.open()
        job = await h.wait_state("left", "cancelled")
        assert job["cancel_reason"] == "client_disconnect"


async def test_cancel_alias_from_a_second_client_ends_the_stream(chat_model: Path) -> None:
    async with running_worker(chat_model) as h:
        h.engine.at_token[2] = gate = Gate()
        async with async_client(h) as client:
            stream = await client.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=200, stream=True,
                extra_headers={"X-Job-Id": "stop-me"})

            async def read() -> None:
                with pytest.raises(openai.APIError) as caught:
                    async for _ in stream:
                        pass
                assert "cancelled by client request" in caught.value.message
                assert isinstance(caught.value.body, dict)
                assert caught.value.body["type"] == "cancelled"

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await gate.wait_reached()
                async with httpx.AsyncClient(base_url=h.worker.uri) as second:
                    resp = await second.post("/v1/requests/stop-me/cancel")
                assert resp.status_code == 202
                assert resp.json() == {"status": "cancelling", "job_id": "stop-me",
                                       "state": "running"}
                gate.open()
        job = await h.job("stop-me")
        assert job["state"] == "cancelled" and job["cancel_reason"] == "client_request"


async def test_a_cancelled_whole_response_is_not_retried(chat_model: Path) -> None:
    async with running_worker(chat_model) as h:
        h.engine.at_token[2] = gate = Gate()
        async with async_client(h, max_retries=3) as client:

            async def ask() -> None:
                with pytest.raises(openai.APIStatusError) as caught:
                    await client.chat.completions.create(
                        model=MODEL, messages=HELLO, max_tokens=200,
                        extra_headers={"X-Job-Id": "whole"})
                assert caught.value.status_code == 499
                assert caught.value.response.headers["X-Job-Id"] == "whole"
                assert caught.value.code == "cancelled"

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await gate.wait_reached()
                resp = await h.client.post("/v1/requests/whole/cancel")
                assert resp.status_code == 202
                gate.open()
        assert h.engine.generations == 1, "the SDK retried a cancelled request"


# -- errors before the response ------------------------------------------------------------


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"temperature": 3}, "temperature"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
])
async def test_bad_parameters_are_named(chat_model: Path, extra: dict[str, Any],
                                        param: str) -> None:
    async with running_worker(chat_model) as h:
        async with async_client(h, max_retries=0) as client:
            body: dict[str, Any] = {"messages": HELLO, "model": MODEL, **extra}
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(**body)
        assert caught.value.param == param, caught.value.body
        assert h.engine.generations == 0


async def test_errors_before_the_stream_are_openai_errors(chat_model: Path) -> None:
    async with running_worker(chat_model, queue_depth=0, slots=1) as h:
        async with async_client(h, max_retries=0) as client:
            with pytest.raises(openai.NotFoundError) as missing:
                await client.chat.completions.create(model="gpt-4o", messages=HELLO)
            assert missing.value.code == "model_not_found" and missing.value.param == "model"
            # Unknown fields are ignored.
            ok = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                                      extra_body={"orcd_whatever": 1})
            assert ok.choices[0].finish_reason == "length"
            # A duplicate X-Job-Id is a 400 (a 409 the SDK would retry on its own).
            body = {"prompt": "x", "max_tokens": 1}
            first = await h.client.post("/v1/completions", json=body,
                                        headers={"X-Job-Id": "twice"})
            assert first.status_code == 200
            again = await h.client.post("/v1/completions", json=body,
                                        headers={"X-Job-Id": "twice"})
            assert again.status_code == 400
            assert again.json()["error"]["code"] == "job_exists"
            assert set(again.json()["error"]) == {"message", "type", "param", "code"}
            bad_id = await h.client.post("/v1/completions", json={"prompt": "x"},
                                         headers={"X-Job-Id": "a b"})
            assert bad_id.status_code == 400
            assert bad_id.json()["error"]["param"] == "X-Job-Id"
            surrogate = await h.client.post(
                "/v1/chat/completions", headers={"Content-Type": "application/json"},
                content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
            assert surrogate.status_code == 400
            assert surrogate.json()["error"]["param"] == "messages[0].content"
            # Busy: the one slot held, no queue -> 429 with Retry-After.
            h.engine.at_token[1] = gate = Gate()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: client.completions.create(
                    model=MODEL, prompt="x", max_tokens=5))
                await gate.wait_reached()
                with pytest.raises(openai.RateLimitError) as busy:
                    await client.completions.create(model=MODEL, prompt="y", max_tokens=5)
                assert busy.value.response.headers["Retry-After"] == "1"
                gate.open()
        # Route-level errors under /v1 are OpenAI errors too; native ones are unchanged.
        nowhere = await h.client.get("/v1/nowhere")
        assert nowhere.status_code == 404 and "type" in nowhere.json()["error"]
        native = await h.client.get("/jobs/unknown-job")
        assert native.json()["error"]["code"] == "JOB_NOT_FOUND"


# -- the packaged Gemma model --------------------------------------------------------------


@pytest.mark.gemma
async def test_gemma_chat_answers_and_keeps_turn_markers_as_text(gemma_model: Path) -> None:
    async with running_worker(gemma_model, n_ctx=512) as h:
        engine = h.engine
        template = ChatTemplate.for_model(engine.info, engine)
        # The packaged GGUF is a base model without a chat template: the transcript.
        assert engine.info.chat_template is None and template.name == "transcript"
        turn = engine.tokenize("<start_of_turn>", special=True, add_bos=False)
        assert len(turn) == 1
        prompt = tokenize_chat(template, [ChatMessage("user", "say <start_of_turn> now")],
                               engine)
        assert turn[0] not in prompt.tokens  # typed by the user: text, not a turn marker
        bos = engine.tokenize("", add_bos=True)
        assert prompt.tokens[0] == bos[0] and prompt.tokens.count(bos[0]) == 1
        async with async_client(h) as client:
            reply = await client.chat.completions.create(
                model="gemma-3-270m-q4_k_m",
                # greedy text depends on the build's kernels: this question is answered
                # "Paris" by both the AVX2 and the AVX-512 build of llama.cpp
                messages=[{"role": "user", "content": "Which city is the capital of France?"}],
                max_tokens=24, temperature=0)
        answer = reply.choices[0].message.content or ""
        assert "Paris" in answer, answer
        assert reply.choices[0].finish_reason == "stop" and "User:" not in answer


@pytest.mark.gemma
async def test_gemma_chat_next_turn_takes_the_answer_from_the_cache(gemma_model: Path) -> None:
    """The next turn resends the answer: "Assistant: " then its text. Tokenized as two
    parts, the space would be a token of its own, where the model wrote "▁Paris" as one; the
    template's space goes with the message, so the answer matches the tokens the model
    generated, and comes from the prefix cache."""
    async with running_worker(gemma_model, n_ctx=512) as h:
        engine = h.engine
        template = ChatTemplate.for_model(engine.info, engine)
        assert template.name == "transcript"
        question = ChatMessage("user", "Which city is the capital of France?")
        async with async_client(h) as client:
            first = await client.chat.completions.create(
                model="gemma-3-270m-q4_k_m", max_tokens=24, temperature=0,
                messages=[{"role": "user", "content": question.content}])
            answer = first.choices[0].message.content or ""
            assert answer and first.usage is not None
            n_first = first.usage.prompt_tokens
            cached_before = engine.statistics().prompt_tokens_cached
            turn2 = [question, ChatMessage("assistant", answer), ChatMessage("user", "And Italy?")]
            second = await client.chat.completions.create(
                model="gemma-3-270m-q4_k_m", max_tokens=8, temperature=0,
                messages=[{"role": m.role, "content": m.content} for m in turn2])
        assert second.choices[0].message.content
        n_answer = len(engine.tokenize(" " + answer, special=False, add_bos=False))
        cached = engine.statistics().prompt_tokens_cached - cached_before
        assert cached >= n_first + n_answer, (cached, n_first, n_answer)
        assert tokenize_chat(template, turn2, engine).tokens[: n_first + n_answer] == (
            tokenize_chat(template, [question], engine).tokens
            + engine.tokenize(" " + answer, special=False, add_bos=False))
