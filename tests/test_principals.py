"""Principals over real sockets (CONTRACT §10): tokens, per-principal job ids, ownership,
admins, quotas, and the refusal to serve the network without an auth file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from .conftest import LogCapture
from .harness import Event, Gate, Harness, bearer, make_auth_file, running_worker, sse_events
from .test_process import assert_one_error_line, run_cli

ROLES = {"alice": "user", "bob": "user", "ops": "admin"}


@asynccontextmanager
async def principals_worker(tiny_model: Path, tmp_path: Path, **overrides: Any
                            ) -> AsyncIterator[tuple[Harness, dict[str, httpx.AsyncClient],
                                                     dict[str, str]]]:
    """A worker with alice, bob (users) and ops (admin); a client for each, and the tokens."""
    tokens = make_auth_file(tmp_path / "auth", **ROLES)
    async with running_worker(tiny_model, auth_file=tmp_path / "auth", **overrides) as h:
        uri = h.worker.uri
        clients = {name: httpx.AsyncClient(base_url=uri, timeout=30, headers=bearer(token))
                   for name, token in tokens.items()}
        try:
            yield h, clients, tokens
        finally:
            for client in clients.values():
                await client.aclose()


async def run_job(client: httpx.AsyncClient, job_id: str, **body: Any) -> list[Event]:
    body = {"prompt": "hello", "max_tokens": 4, **body}
    async with client.stream("POST", "/execute", json={"job_id": job_id, **body}) as resp:
        assert resp.status_code == 200, await resp.aread()
        return [e async for e in sse_events(resp)]


async def held_job(h: Harness, client: httpx.AsyncClient, job_id: str, nursery: trio.Nursery,
                   events: list[Event]) -> Gate:
    """Start ``job_id`` and hold the engine after its 2nd token; returns the gate."""
    h.engine.at_token[2] = gate = Gate()
    nursery.start_soon(_collect, client, job_id, events)
    await gate.wait_reached()
    return gate


async def _collect(client: httpx.AsyncClient, job_id: str, events: list[Event]) -> None:
    events.extend(await run_job(client, job_id, max_tokens=50))


def assert_401(resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


# ---------------------------------------------------------------------------- tokens


async def test_every_route_but_health_and_the_playground_needs_a_token(
        tiny_model: Path, tmp_path: Path, log_capture: LogCapture) -> None:
    async with principals_worker(tiny_model, tmp_path) as (h, users, tokens):
        anon = h.client
        for method, path, body in [
            ("POST", "/execute", {"job_id": "x", "prompt": "hi"}),
            ("POST", "/cancel", {"job_id": "x"}), ("GET", "/jobs", None),
            ("GET", "/jobs/x", None), ("GET", "/metrics", None), ("POST", "/shutdown", None),
            ("GET", "/no-such-route", None),
        ]:
            for headers in ({}, bearer("not-a-token"), {"Authorization": tokens["alice"]},
                            {"Authorization": f"Basic {tokens['alice']}"}):
                resp = await anon.request(method, path, json=body, headers=headers)
                assert_401(resp)
                err = resp.json()["error"]
                assert err["code"] == "UNAUTHENTICATED" and err["retriable"] is False
        for path in ("/v1/models", "/v1/chat/completions", "/v1/requests/x/cancel"):
            method = "GET" if path == "/v1/models" else "POST"
            resp = await anon.request(method, path, json={})
            assert_401(resp)  # an OpenAI error object, which the SDKs raise as auth errors
            assert resp.json()["error"]["code"] == "invalid_api_key"
            assert resp.json()["error"]["type"] == "invalid_request_error"
        for path in ("/health", "/", "/ui/app.js", "/ui/style.css"):
            assert (await anon.get(path)).status_code == 200, path
        health = (await anon.get("/health")).json()
        assert health["ledger"] is None  # --ledger none in tests
        # A valid token works; the scheme is case-insensitive.
        resp = await anon.get("/jobs", headers={"Authorization": f"bearer {tokens['bob']}"})
        assert resp.status_code == 200 and resp.json() == {"jobs": []}
        assert (await users["alice"].get("/metrics")).status_code == 200
    text = "\n".join(str(line) for line in log_capture.lines())
    for token in tokens.values():
        assert token not in text, "a token reached the log"


async def test_public_metrics_needs_no_token(tiny_model: Path, tmp_path: Path) -> None:
    async with principals_worker(tiny_model, tmp_path, public_metrics=True) as (h, _, _t):
        assert (await h.client.get("/metrics")).status_code == 200
        assert_401(await h.client.get("/jobs"))


async def test_health_names_no_job_when_tokens_are_needed(tiny_model: Path,
                                                          tmp_path: Path) -> None:
    async with principals_worker(tiny_model, tmp_path) as (h, users, _):
        events: list[Event] = []
        async with trio.open_nursery() as nursery:
            gate = await held_job(h, users["alice"], "secret-name", nursery, events)
            running = (await h.client.get("/health")).json()["running"]
            assert [r["job_id"] for r in running] == [None]
            gate.open()
        assert events[-1].name == "end"


# ---------------------------------------------------------------------------- namespaces


async def test_two_principals_may_use_the_same_job_id(tiny_model: Path, tmp_path: Path) -> None:
    async with principals_worker(tiny_model, tmp_path) as (_, users, _t):
        alice = await run_job(users["alice"], "job-1", max_tokens=3)
        bob = await run_job(users["bob"], "job-1", max_tokens=5)
        assert alice[-1].name == "end" and alice[-1].data["tokens_out"] == 3
        assert bob[-1].name == "end" and bob[-1].data["tokens_out"] == 5
        mine = (await users["alice"].get("/jobs/job-1")).json()
        theirs = (await users["bob"].get("/jobs/job-1")).json()
        assert (mine["principal"], mine["tokens_out"]) == ("alice", 3)
        assert (theirs["principal"], theirs["tokens_out"]) == ("bob", 5)
        # Each namespace still refuses its own duplicate.
        again = await users["alice"].post("/execute", json={"job_id": "job-1", "prompt": "x"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "JOB_EXISTS"


async def test_another_principals_job_does_not_exist(tiny_model: Path, tmp_path: Path) -> None:
    """bob can neither see nor cancel alice's job: 404, 202 'unknown' with a tombstone in his
    own namespace, an empty list; alice's job runs to its end untouched."""
    async with principals_worker(tiny_model, tmp_path) as (h, users, _t):
        alice, bob = users["alice"], users["bob"]
        events: list[Event] = []
        async with trio.open_nursery() as nursery:
            gate = await held_job(h, alice, "a-1", nursery, events)
            seen = await bob.get("/jobs/a-1")
            assert seen.status_code == 404 and seen.json()["error"]["code"] == "JOB_NOT_FOUND"
            assert (await bob.get("/jobs")).json() == {"jobs": []}
            assert (await bob.get("/jobs", params={"state": "running"})).json() == {"jobs": []}
            cancel = await bob.post("/cancel", json={"job_id": "a-1"})
            assert cancel.status_code == 202 and cancel.json()["state"] == "unknown"
            v1 = await bob.post("/v1/requests/a-1/cancel")
            assert v1.status_code == 202 and v1.json()["state"] == "unknown"
            record = (await alice.get("/jobs/a-1")).json()
            assert record["state"] == "running" and record["cancel_requested_at"] is None
            gate.open()
        assert events[-1].name == "end", events[-1]
        assert (await alice.get("/jobs/a-1")).json()["state"] == "completed"
        # bob's cancel left its tombstone in bob's namespace: his own a-1 never starts.
        bobs = await run_job(bob, "a-1")
        assert [e.name for e in bobs] == ["error"]
        assert bobs[0].data["reason"] == "cancelled_before_start"
        record = (await bob.get("/jobs/a-1")).json()
        assert (record["principal"], record["cancelled_by"]) == ("bob", "bob")
        assert [j["job_id"] for j in (await alice.get("/jobs")).json()["jobs"]] == ["a-1"]


async def test_a_user_cannot_name_another_principal(tiny_model: Path, tmp_path: Path) -> None:
    async with principals_worker(tiny_model, tmp_path) as (_, users, _t):
        bob = users["bob"]
        await run_job(users["alice"], "a-2")
        for resp in [await bob.post("/cancel", json={"job_id": "a-2", "principal": "alice"}),
                     await bob.get("/jobs/a-2", params={"principal": "alice"}),
                     await bob.get("/jobs", params={"principal": "alice"}),
                     await bob.post("/v1/requests/a-2/cancel", params={"principal": "alice"})]:
            assert resp.status_code == 403, resp.text
        own = await bob.get("/jobs", params={"principal": "bob"})
        assert own.status_code == 200 and own.json() == {"jobs": []}
        assert (await users["alice"].get("/jobs/a-2")).json()["cancel_requested_at"] is None


async def test_an_admin_sees_and_cancels_every_job(tiny_model: Path, tmp_path: Path) -> None:
    async with principals_worker(tiny_model, tmp_path) as (h, users, _t):
        alice, ops = users["alice"], users["ops"]
        await run_job(users["bob"], "b-1")
        events: list[Event] = []
        async with trio.open_nursery() as nursery:
            gate = await held_job(h, alice, "a-3", nursery, events)
            listed = (await ops.get("/jobs")).json()["jobs"]
            assert [(j["principal"], j["job_id"], j["state"]) for j in listed] == [
                ("alice", "a-3", "running"), ("bob", "b-1", "completed")]
            only = (await ops.get("/jobs", params={"principal": "bob"})).json()["jobs"]
            assert [j["job_id"] for j in only] == ["b-1"]
            # Without a principal an admin acts in its own namespace, like anyone.
            assert (await ops.get("/jobs/a-3")).status_code == 404
            found = await ops.get("/jobs/a-3", params={"principal": "alice"})
            assert found.json()["principal"] == "alice"
            resp = await ops.post("/cancel", json={"job_id": "a-3", "principal": "alice"})
            assert resp.status_code == 202
            assert resp.json() == {"status": "cancelling", "job_id": "a-3", "state": "running",
                                   "principal": "alice"}
            with trio.fail_after(5):
                while not events:
                    await trio.sleep(0.005)
            gate.open()
        assert events[-1].name == "error" and events[-1].data["reason"] == "client_request"
        record = (await alice.get("/jobs/a-3")).json()
        assert (record["state"], record["cancelled_by"]) == ("cancelled", "ops")
        unknown = await ops.post("/cancel", json={"job_id": "z", "principal": "mallory"})
        assert unknown.status_code == 400 and "mallory" in unknown.text


async def test_only_an_admin_may_shut_down(tiny_model: Path, tmp_path: Path) -> None:
    async with principals_worker(tiny_model, tmp_path) as (h, users, _t):
        refused = await users["alice"].post("/shutdown")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "FORBIDDEN"
        assert h.worker.shutdown_reason is None
        assert (await users["ops"].post("/shutdown")).status_code == 202
        assert h.worker.shutdown_reason == "POST /shutdown"


# ---------------------------------------------------------------------------- quotas


async def test_quota_per_principal_is_429_with_retry_after(tiny_model: Path,
                                                           tmp_path: Path) -> None:
    async with principals_worker(tiny_model, tmp_path, max_active_per_principal=1) as (
            h, users, _t):
        alice = users["alice"]
        events: list[Event] = []
        async with trio.open_nursery() as nursery:
            gate = await held_job(h, alice, "q-1", nursery, events)
            over = await alice.post("/execute", json={"job_id": "q-2", "prompt": "x"})
            assert over.status_code == 429, over.text
            assert over.json()["error"]["code"] == "QUOTA_EXCEEDED"
            assert over.json()["error"]["retriable"] is True
            assert int(over.headers["Retry-After"]) >= 1
            v1 = await alice.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert v1.status_code == 429 and v1.json()["error"]["type"] == "rate_limit_error"
            assert v1.json()["error"]["code"] == "quota_exceeded" and v1.headers["Retry-After"]
            # The limit is alice's alone: bob is admitted (queued behind the held engine).
            nursery.start_soon(_collect, users["bob"], "b-q", events)
            with trio.fail_after(5):
                while h.worker.registry.get("b-q", "bob") is None:
                    await trio.sleep(0.005)
            gate.open()
        assert (await alice.get("/jobs/q-2")).status_code == 404
        after = await run_job(alice, "q-3")  # the quota frees with the job's end
        assert after[-1].name == "end"


# ---------------------------------------------------------------------------- defaults


async def test_without_an_auth_file_every_caller_is_anonymous(tiny_model: Path) -> None:
    async with running_worker(tiny_model) as h:
        events = await h.execute(job_id="anon", prompt="hi", max_tokens=2)
        assert events[-1].name == "end"
        record = await h.job("anon")
        assert (record["principal"], record["cancelled_by"]) == ("anonymous", None)
        assert (await h.client.post("/cancel", json={"job_id": "anon"})).json()["state"] \
            == "completed"
        assert (await h.client.get("/jobs", params={"principal": "anonymous"})).json()["jobs"]


def test_a_public_bind_without_an_auth_file_is_refused(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "example.org"):
        assert_one_error_line(run_cli("serve", "--host", host, "--port", "0"),
                              host, "--auth-file", "--insecure-no-auth")


def test_a_bad_auth_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "auth"
    bad.write_text("sha256:abc alice user\n")
    assert_one_error_line(run_cli("serve", "--auth-file", str(bad), "--port", "0"),
                          f"{bad}:1", "bad digest")
    assert_one_error_line(run_cli("serve", "--auth-file", str(tmp_path / "missing")),
                          "auth file not found")


async def test_a_finished_job_is_never_listed_by_its_older_ledger_row(tiny_model: Path,
                                                                       tmp_path: Path) -> None:
    """Regression (found by the chaos suite): right after a job ended, the ledger's row could
    still say ``running`` (the writer commits in batches); ``/jobs?state=running`` merged that
    row in, because only the jobs matching the filter were checked against memory."""
    async with running_worker(tiny_model, ledger=str(tmp_path / "ledger.sqlite3")) as h:
        for i in range(20):
            events = await h.execute(job_id=f"quick-{i}", prompt="x", max_tokens=2)
            assert events[-1].name == "end"
            running = (await h.client.get("/jobs", params={"state": "running"})).json()["jobs"]
            assert [j["job_id"] for j in running] == [], (i, running)
