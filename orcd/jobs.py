"""Jobs: admission, the queue in front of the slots, cancellation and the job history.

Each job is a :class:`trio.CancelScope` plus a :class:`CancelFlag`. ``Job.request_cancel``
sets both: the scope ends a wait for a slot at once, the flag stops the generation thread
and llama.cpp's running decode. Every job runs in its own nursery inside the registry's
nursery (which ``serve()`` owns), next to a watcher that turns the deadline, or the
registry's own cancellation, into the same cancel. Whatever ends a job, ``_finish`` sends
its one terminal event and closes its stream, shielded, after the slot is clean again.

Job ids are per principal (CONTRACT §10): each principal has its own :class:`_Namespace` of
jobs, cancel tombstones and finished-job history, each bounded on its own, so one principal's
traffic can neither reach nor crowd out another's. Every state change of a job goes to the
ledger, when there is one, which also answers for jobs memory no longer holds.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import attrs
import trio

from . import logs
from .auth import ANONYMOUS, ANONYMOUS_NAME, SYSTEM_NAME, Principal
from .bridge import Engine, Generation, run_engine
from .config import Config
from .engine import CancelFlag, Outcome, Phase, SamplingParams
from .errors import (
    InvalidRequest,
    JobExists,
    NotReady,
    QuotaExceeded,
    ShuttingDown,
    WorkerBusy,
)
from .metrics import Metrics
from .outbox import Outbox, StreamEvent

if TYPE_CHECKING:
    from .api.schema import ExecuteRequest
    from .ledger import Ledger

State = Literal["queued", "running", "completed", "cancelled", "failed"]
ACTIVE: frozenset[str] = frozenset({"queued", "running"})
CancelReason = Literal[
    "client_request", "client_disconnect", "client_stalled", "shutdown",
    "cancelled_before_start", "deadline",
]
MAX_JSON_SEED = 2**53 - 1  # generated seeds stay exact in every JSON client


@attrs.define(eq=False)
class Job:
    job_id: str
    correlation_id: str
    prompt_tokens: list[int]
    params: SamplingParams
    deadline: float  # trio clock
    created_at: str
    outbox: Outbox
    state: State = "queued"
    phase: Phase = "queued"
    slot: int | None = None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    flag: CancelFlag = attrs.field(factory=CancelFlag)
    slot_granted: trio.Event = attrs.field(factory=trio.Event)
    started_at: str | None = None
    finished_at: str | None = None
    finished_mono: float | None = None
    cancel_requested_at: str | None = None
    cancelled_at: str | None = None
    cancel_reason: CancelReason | None = None
    tokens_out: int = 0
    pieces: int = 0
    stop_reason: str | None = None
    error: dict[str, Any] | None = None
    started_mono: float = 0.0
    position: int | None = None  # place in the queue while waiting for a slot
    counted: bool = False  # counted in the registry's active jobs
    cancelled: trio.Event = attrs.field(factory=trio.Event)  # set by the first cancel
    generation: Generation | None = None  # its sequence in the engine, once started
    abort: Callable[[], None] | None = None  # tells the engine about the cancel
    principal: str = ANONYMOUS_NAME  # the owner: job ids are unique per principal
    cancelled_by: str | None = None  # who asked for the first cancel (SYSTEM_NAME: the worker)
    on_change: Callable[[Job], None] | None = None  # a state change to record (the ledger)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def request_cancel(self, reason: CancelReason, by: str) -> bool:
        """Ask the job to stop on behalf of the principal named ``by``; the first reason (and
        canceller) wins. False if the job had already ended."""
        if not self.active:
            return False
        first = self.cancel_reason is None
        if first:
            self.cancel_reason = reason
            self.cancelled_by = by
            self.cancel_requested_at = logs.utc_now()
        self.flag.set()
        self.scope.cancel()
        self.cancelled.set()
        if self.abort is not None:
            self.abort()
        if first and self.on_change is not None:  # after the engine heard of it
            self.on_change(self)
        return True

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """Queue an event for the stream. Never blocks, never raises: a terminal event
        always has room, and a stream nobody reads any more keeps nothing."""
        event = StreamEvent(name, data)
        if event.terminal:
            self.outbox.finish(event)
        else:
            self.outbox.put(event)

    def snapshot(self) -> dict[str, Any]:
        max_tokens = self.params.max_tokens
        return {
            "job_id": self.job_id,
            "state": self.state,
            "correlation_id": self.correlation_id,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "cancel_requested_at": self.cancel_requested_at,
            "cancelled_at": self.cancelled_at,
            "cancel_reason": self.cancel_reason,
            "tokens_out": self.tokens_out,
            "max_tokens": max_tokens,
            "progress": round(self.tokens_out / max_tokens, 4) if max_tokens else 0.0,
            "stop_reason": self.stop_reason,
            "error": self.error,
            "principal": self.principal,
            "cancelled_by": self.cancelled_by,
        }


@attrs.frozen
class JobRecord:
    """What the history keeps of a finished job: its snapshot, nothing that holds resources."""

    job_id: str
    state: State
    created_at: str
    finished_mono: float
    data: dict[str, Any]
    principal: str = ANONYMOUS_NAME

    active = False

    @classmethod
    def of(cls, job: Job) -> JobRecord:
        assert job.finished_mono is not None
        return cls(job.job_id, job.state, job.created_at, job.finished_mono, job.snapshot(),
                   job.principal)

    @property
    def cancel_reason(self) -> CancelReason | None:
        reason: CancelReason | None = self.data["cancel_reason"]
        return reason

    def request_cancel(self, reason: CancelReason, by: str) -> bool:
        return False

    def snapshot(self) -> dict[str, Any]:
        return dict(self.data)


@attrs.define(eq=False)
class _Namespace:
    """One principal's jobs: ids are unique within it, and its memory is bounded on its own.

    Both kinds of memory are kept oldest first, so forgetting is O(1) amortized.
    """

    jobs: dict[str, Job | JobRecord] = attrs.field(factory=dict)
    # Cancels for ids not seen yet: id -> (expiry on the trio clock, who cancelled).
    tombstones: OrderedDict[str, tuple[float, str]] = attrs.field(factory=OrderedDict)
    # Finished jobs in the history: id -> when it finished (time.monotonic).
    finished: OrderedDict[str, float] = attrs.field(factory=OrderedDict)
    active: int = 0  # queued + running jobs, for --max-active-per-principal


@attrs.frozen
class RegistryStats:
    slots: int
    running: int
    queued: int
    draining: bool


_MESSAGES: dict[str, str] = {
    "client_request": "Job cancelled by client request",
    "client_disconnect": "Job cancelled because the client disconnected",
    "client_stalled": "Job cancelled because the client stopped reading its stream",
    "shutdown": "Job cancelled because the worker is shutting down",
    "cancelled_before_start": "Job was cancelled before it was submitted",
}


@attrs.define(eq=False)
class JobRegistry:
    """Owns every job: admission, the FIFO queue, the slots and the finished-job history."""

    config: Config
    metrics: Metrics
    engine: Engine | None = None
    draining: bool = False
    active_limit: int | None = None  # queued + running jobs per principal (None: no limit)
    ledger: Ledger | None = None  # every state change is recorded there, when set
    _nursery: trio.Nursery | None = None
    _spaces: dict[str, _Namespace] = attrs.field(factory=dict)  # principal name -> its jobs
    _waiting: list[Job] = attrs.field(factory=list)
    _free_slots: list[int] = attrs.field(factory=list)
    _n_active: int = 0
    _idle: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self._idle.set()
        self.metrics.track_jobs(lambda: self.statistics().running, lambda: len(self._waiting))

    def _space(self, principal: str) -> _Namespace:
        space = self._spaces.get(principal)
        if space is None:
            space = self._spaces[principal] = _Namespace()
        return space

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[JobRegistry] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Open the nursery every job runs in; ready once it is open."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

    def attach_engine(self, engine: Engine) -> None:
        """Run the engine's step loop (in the registry's nursery) and start admitting jobs."""
        assert self._nursery is not None, "JobRegistry.run() is not running"
        self._nursery.start_soon(run_engine, engine, name="engine")
        self._free_slots = list(range(engine.n_slots))
        self.engine = engine

    async def drain(self, grace_s: float) -> None:
        """Refuse new jobs, cancel queued ones, give running ones ``grace_s``, then cancel."""
        self.draining = True
        for job in list(self._waiting):
            job.request_cancel("shutdown", SYSTEM_NAME)
        with trio.move_on_after(grace_s):
            await self.wait_idle()
        for space in list(self._spaces.values()):
            for entry in list(space.jobs.values()):
                entry.request_cancel("shutdown", SYSTEM_NAME)
        with trio.move_on_after(10):
            await self.wait_idle()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # -- admission -------------------------------------------------------------------

    async def submit(self, req: ExecuteRequest, correlation_id: str, *,
                     tokens: list[int] | None = None, principal: Principal = ANONYMOUS) -> Job:
        """Admit a validated request as ``principal``'s job, or raise the contract's error
        for refusing it.

        ``tokens``: the prompt already tokenized (the ``/v1`` chat routes tokenize a rendered
        chat template themselves); otherwise ``req.prompt`` is tokenized here.
        """
        owner = principal.name
        if self.draining:
            raise ShuttingDown("the worker is shutting down and takes no new jobs")
        engine = self.engine
        if engine is None:
            raise NotReady("the model is still loading; retry shortly")
        if tokens is None:
            tokens = await trio.to_thread.run_sync(engine.tokenize, req.prompt)
        params = self._sampling(req, len(tokens), engine)
        recorded = await self._recall(owner, req.job_id)  # an id only the ledger remembers
        # Everything below is synchronous: no other request can slip in between the checks.
        if self.draining:
            raise ShuttingDown("the worker is shutting down and takes no new jobs")
        self._forget_expired()
        space = self._space(owner)
        existing = space.jobs.get(req.job_id)
        if existing is not None:
            what = "is active" if existing.active else "is still remembered"
            raise JobExists(f"job {req.job_id!r} {what}", details={"state": existing.state})
        if recorded is not None:
            raise JobExists(f"job {req.job_id!r} is still remembered",
                            details={"state": recorded["state"]})
        tombstone = space.tombstones.pop(req.job_id, None)
        limit = self.active_limit
        if tombstone is None and limit is not None and space.active >= limit:
            raise QuotaExceeded(
                f"{owner} already has {space.active} job(s) queued or running, the limit "
                f"per principal", details={"active": space.active, "limit": limit})
        queue_full = len(self._waiting) >= self.config.queue_depth
        if tombstone is None and not self._free_slots and queue_full:
            raise WorkerBusy(
                f"all {engine.n_slots} slot(s) busy and {len(self._waiting)} job(s) queued",
                details={"queued": len(self._waiting), "queue_depth": self.config.queue_depth},
            )
        timeout_s = req.timeout_ms / 1000 if req.timeout_ms else self.config.inference_timeout_s
        job = Job(
            job_id=req.job_id, correlation_id=correlation_id, prompt_tokens=tokens,
            params=params, deadline=trio.current_time() + timeout_s, created_at=logs.utc_now(),
            # started + one piece per token at most: every event of the job always fits.
            outbox=Outbox(req.job_id, params.max_tokens + 1), principal=owner,
        )
        space.jobs[job.job_id] = job
        digest = hashlib.sha256(req.prompt.encode("utf-8")).hexdigest()
        logs.log("execute_start", f"Job {job.job_id} admitted", job_id=job.job_id,
                 correlation_id=correlation_id, principal=owner, prompt_chars=len(req.prompt),
                 prompt_tokens=len(tokens), prompt_sha256=digest, max_tokens=params.max_tokens)
        self._record(job)
        job.on_change = self._record
        if tombstone is not None:
            job.request_cancel("cancelled_before_start", tombstone[1])
            self._finish(job, "cancelled")
            return job
        job.counted = True
        space.active += 1
        self._mark_active(+1)
        if self._free_slots:
            self._grant(job, self._free_slots.pop(0))
        else:
            self._waiting.append(job)
            job.position = len(self._waiting)
            job.outbox.set_position(job.position)
        assert self._nursery is not None, "JobRegistry.run() is not running"
        self._nursery.start_soon(self._run, job, name=f"job:{job.job_id}")
        return job

    def _sampling(self, req: ExecuteRequest, n_prompt: int, engine: Engine) -> SamplingParams:
        n_ctx = engine.info.context_length
        errors = []
        room = n_ctx - n_prompt
        if room < 1:
            errors.append({"field": "prompt", "constraint": "context",
                           "message": f"prompt is {n_prompt} tokens; the context holds {n_ctx} "
                                      "and needs room for at least 1 generated token"})
        elif req.max_tokens is not None and n_prompt + req.max_tokens > n_ctx:
            errors.append({"field": "max_tokens", "constraint": "context",
                           "message": f"prompt ({n_prompt} tokens) + max_tokens "
                                      f"({req.max_tokens}) exceeds the context of {n_ctx}"})
        vocab = engine.info.vocab_size
        if req.top_k > vocab:
            errors.append({"field": "top_k", "constraint": "range",
                           "message": f"top_k must be 0..{vocab} (the vocabulary), "
                                      f"got {req.top_k}"})
        if errors:
            raise InvalidRequest(errors)
        max_tokens = req.max_tokens or min(self.config.max_tokens_out, room)
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_JSON_SEED + 1)
        return SamplingParams(
            max_tokens=max_tokens, seed=seed, temperature=req.temperature, top_p=req.top_p,
            top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            stop=req.stop,
        )

    # -- cancellation ----------------------------------------------------------------

    def cancel(self, job_id: str, correlation_id: str, by: Principal = ANONYMOUS,
               owner: str | None = None) -> str:
        """Cancel ``owner``'s job (default: the canceller's own) in whatever state it is, on
        behalf of ``by``; returns the state the cancel found. An id memory does not hold
        leaves a tombstone in ``owner``'s namespace, never another's."""
        owner = by.name if owner is None else owner
        self._forget_expired()
        space = self._space(owner)
        job = space.jobs.get(job_id)
        if job is None:
            self._remember_unknown_cancel(space, job_id, by.name)
            logs.log("cancel_unknown",
                     f"Cancel for unknown job {job_id}; remembered for "
                     f"{self.config.cancel_memory_s:g} s", level=logging.WARNING,
                     job_id=job_id, correlation_id=correlation_id, principal=owner,
                     cancelled_by=by.name)
            return "unknown"
        state = job.state
        if isinstance(job, Job) and job.request_cancel("client_request", by.name):
            logs.log("cancel", f"Cancelling job {job_id} ({state})", job_id=job_id,
                     correlation_id=correlation_id, job_correlation_id=job.correlation_id,
                     phase=job.phase, principal=owner, cancelled_by=by.name)
        else:
            logs.log("cancel", f"Cancel for job {job_id} that already ended {state}",
                     job_id=job_id, correlation_id=correlation_id, principal=owner,
                     cancelled_by=by.name)
        return state

    async def cancel_or_recall(self, job_id: str, correlation_id: str, by: Principal,
                               owner: str | None = None) -> str:
        """:meth:`cancel`, but an id that only the ledger remembers (finished long ago, or
        by a previous process) answers its recorded state and leaves no tombstone. A job in
        memory is cancelled before anything else happens: no thread, no checkpoint."""
        owner = by.name if owner is None else owner
        if self.ledger is None or self.get(job_id, owner) is not None:
            return await self._cancel_and_enforce(job_id, correlation_id, by, owner)
        recorded = await self._recall(owner, job_id)
        if recorded is None or self.get(job_id, owner) is not None:
            return await self._cancel_and_enforce(job_id, correlation_id, by, owner)
        logs.log("cancel", f"Cancel for job {job_id} that already ended {recorded['state']} "
                 "(from the ledger)", job_id=job_id, correlation_id=correlation_id,
                 principal=owner, cancelled_by=by.name)
        return str(recorded["state"])

    async def _cancel_and_enforce(self, job_id: str, correlation_id: str, by: Principal,
                                  owner: str) -> str:
        """:meth:`cancel`, then, for a job whose sequence is in the engine, its terminal event
        at once, before the cancel's own response: the job's task would send the same event
        when it next runs, one to two scheduler hops later. The engine still frees the
        sequence by the end of its step, and only then does the slot pass on.

        The checkpoint at the end lets the stream's writer, woken by the terminal event,
        send it before the caller builds its response (lean client, cancel one of 4, 70 reps
        each side by side: CANCELLED p50 3.75 -> 3.37 ms, the 202 no later)."""
        state = self.cancel(job_id, correlation_id, by, owner)
        job = self.get(job_id, owner)
        if (isinstance(job, Job) and job.generation is not None
                and not job.generation.done.is_set()):
            self._conclude(job, None)
        await trio.lowlevel.checkpoint()
        return state

    # -- reading ---------------------------------------------------------------------

    def get(self, job_id: str, owner: str = ANONYMOUS_NAME) -> Job | JobRecord | None:
        """``owner``'s job ``job_id`` if memory holds it."""
        self._forget_expired()
        space = self._spaces.get(owner)
        return space.jobs.get(job_id) if space is not None else None

    def jobs(self, state: str | None = None, owner: str | None = None
             ) -> list[Job | JobRecord]:
        """The jobs memory holds, of ``owner`` (None: every principal), active first."""
        self._forget_expired()
        spaces = (self._spaces.values() if owner is None
                  else [self._spaces[owner]] if owner in self._spaces else [])
        everything = sorted((j for space in spaces for j in space.jobs.values()),
                            key=lambda j: (not j.active, j.created_at))
        return [j for j in everything if state is None or j.state == state]

    async def find(self, job_id: str, owner: str) -> dict[str, Any] | None:
        """The record of ``owner``'s job: from memory, else from the ledger (in a thread)."""
        found = self.get(job_id, owner)
        if found is not None:
            return found.snapshot()
        return await self._recall(owner, job_id)

    async def records(self, state: str | None = None, owner: str | None = None
                      ) -> list[dict[str, Any]]:
        """Every record within the history: memory's, then the ledger's for the rest."""
        snapshots = [j.snapshot() for j in self.jobs(state, owner)]
        ledger = self.ledger
        if ledger is None:
            return snapshots
        older = await trio.to_thread.run_sync(partial(
            ledger.list, owner, state, since_s=self.config.job_history_s,
            limit=self.config.job_history))
        # Memory is the truth for every job it holds, whatever the filter: the ledger's row
        # of a job memory holds may be older (a finished job's row still says running).
        seen = {(j.snapshot()["principal"], j.job_id) for j in self.jobs(None, owner)}
        snapshots.extend(_public(r) for r in older if (r["principal"], r["job_id"]) not in seen)
        snapshots.sort(key=lambda s: s["state"] not in ACTIVE)  # stable: active first
        return snapshots

    async def _recall(self, owner: str, job_id: str) -> dict[str, Any] | None:
        """The ledger's record of a job memory does not hold, if within the history."""
        ledger = self.ledger
        if ledger is None or self.get(job_id, owner) is not None:
            return None
        record = await trio.to_thread.run_sync(ledger.get, owner, job_id)
        if record is None or record["updated_at"] < time.time() - self.config.job_history_s:
            return None
        return _public(record)

    def statistics(self) -> RegistryStats:
        slots = self.engine.n_slots if self.engine else self.config.slots
        return RegistryStats(slots=slots, running=slots - len(self._free_slots)
                             if self.engine else 0, queued=len(self._waiting),
                             draining=self.draining)

    # -- the job task ----------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, job)
            try:
                await self._lifecycle(job)
            finally:
                nursery.cancel_scope.cancel()

    async def _watch(self, job: Job) -> None:
        """Turn the deadline, or the registry being cancelled, into a cancel of the job."""
        try:
            await trio.sleep_until(job.deadline)
            job.request_cancel("deadline", SYSTEM_NAME)
        except trio.Cancelled:
            if job.active:  # the registry itself is being torn down
                job.request_cancel("shutdown", SYSTEM_NAME)
            raise

    async def _lifecycle(self, job: Job) -> None:
        outcome: Outcome | None = None
        try:
            with job.scope:
                await job.slot_granted.wait()
            if job.slot is None or job.flag.is_set():
                return
            job.state = "running"
            job.started_at = logs.utc_now()
            job.started_mono = time.monotonic()
            self._record(job)
            engine = self.engine
            assert engine is not None
            job.emit("started", {
                "job_id": job.job_id, "model": engine.info.name,
                "started_at": job.started_at, "seed": job.params.seed,
                "prompt_tokens": len(job.prompt_tokens), "correlation_id": job.correlation_id,
            })
            outcome = await self._generate(job, engine)
        finally:
            # Synchronous, so no cancellation can interrupt it: the engine has freed the
            # sequence, its slot goes to the next job, and the terminal event goes out
            # (unless a cancel already sent it).
            self._release(job)
            self._conclude(job, outcome)

    async def _generate(self, job: Job, engine: Engine) -> Outcome:
        """Run the job's sequence in the engine until the engine has freed it.

        A cancel does not wait for the engine: the job's stream ends at once, and the slot
        passes on only when the engine reports the sequence gone (by the end of its step).
        """
        gen = Generation(job.prompt_tokens, job.params, job.flag,
                         on_phase=lambda phase: setattr(job, "phase", phase),
                         on_token=lambda text, n: self._on_token(job, text, n), tag=job.job_id)
        try:
            engine.start(gen.request)
        except Exception as exc:  # an engine bug fails this job only
            return Outcome(status="failed", phase=job.phase, tokens_out=0, decode_time_ms=0.0,
                           stopped_at=time.monotonic(), error_code="INTERNAL",
                           error=f"engine error: {exc!r}")
        job.generation = gen
        job.abort = lambda: engine.cancel(gen.request)
        if job.flag.is_set():  # cancelled between the grant and now
            engine.cancel(gen.request)
        with trio.CancelScope(shield=True):  # the engine decides when the sequence is gone
            await _first_of(gen.done, job.cancelled)
            if not gen.done.is_set():
                self._conclude(job, None)  # the cancel's terminal event, now (if not yet)
                with trio.move_on_after(self.config.cancel_complete_s):
                    await gen.done.wait()
        outcome = gen.outcome
        if outcome is None:
            logs.log("error", f"The engine did not free job {job.job_id}'s sequence within "
                     f"{self.config.cancel_complete_s:g} s", level=logging.ERROR,
                     job_id=job.job_id, correlation_id=job.correlation_id)
            return Outcome(status="failed", phase=job.phase, tokens_out=job.tokens_out,
                           decode_time_ms=0.0, stopped_at=time.monotonic(),
                           error_code="INTERNAL", error="the engine did not stop the job")
        self.metrics.tokens_in.inc(len(job.prompt_tokens))
        self.metrics.prefix_cache_hits.inc(outcome.prompt_tokens_cached)
        if outcome.status == "cancelled" and job.flag.set_at is not None:
            self.metrics.cancel_freed.labels(phase=outcome.phase).observe(
                max(0.0, outcome.stopped_at - job.flag.set_at))
        return outcome

    def _on_token(self, job: Job, text: str, tokens_out: int) -> None:
        self.metrics.tokens_out.inc(tokens_out - job.tokens_out)
        job.tokens_out = tokens_out
        if text and not job.flag.is_set():  # a cancelled job's stream gets no more tokens
            job.emit("token", {"t": text, "i": job.pieces})
            job.pieces += 1

    def _observe_cancel(self, job: Job, phase: Phase, stopped_at: float) -> None:
        """From the cancel to its terminal event: what the client waits for."""
        if job.flag.set_at is not None:
            self.metrics.cancel_latency.labels(phase=phase).observe(
                max(0.0, stopped_at - job.flag.set_at))

    def _conclude(self, job: Job, outcome: Outcome | None) -> None:
        """Turn what happened into the job's final state and its one terminal event."""
        if outcome is not None and outcome.status == "completed":
            self._finish(job, "completed", outcome)
        elif outcome is not None and outcome.status == "failed":
            self._finish(job, "failed", outcome)
        elif job.cancel_reason is not None:
            self._finish(job, "cancelled", outcome)
        else:  # the task died without a cancel or an outcome: an internal failure
            self._finish(job, "failed", outcome)

    def _finish(self, job: Job, state: State, outcome: Outcome | None = None) -> None:
        """Record the final state, send the one terminal event and close the stream."""
        if job.finished_at is not None:
            return
        job.finished_at = logs.utc_now()
        job.finished_mono = time.monotonic()
        if outcome is not None:
            job.tokens_out = outcome.tokens_out
        duration = job.finished_mono - job.started_mono if job.started_mono else 0.0
        level = logging.INFO
        if state == "cancelled":
            self._observe_cancel(job, job.phase, time.monotonic())
        if state == "completed":
            assert outcome is not None
            job.stop_reason = outcome.stop_reason
            job.emit("end", {"tokens_out": outcome.tokens_out,
                             "decode_time_ms": outcome.decode_time_ms,
                             "stop_reason": outcome.stop_reason,
                             "stop_sequence": outcome.stop_sequence})
            metric, action = "completed", "execute_end"
            human = f"Job {job.job_id} completed ({outcome.stop_reason}, {job.tokens_out} tokens)"
        elif state == "cancelled" and job.cancel_reason == "deadline":
            state = "failed"
            job.cancelled_at = job.finished_at
            job.error = {"code": "INFERENCE_TIMEOUT",
                         "message": "the job's deadline passed before it finished"}
            job.emit("error", {**job.error, "retriable": True, "reason": "deadline"})
            metric, action = "timeout", "execute_end"
            human = f"Job {job.job_id} timed out in phase {job.phase}"
        elif state == "cancelled":
            reason = job.cancel_reason or "client_request"
            job.cancelled_at = job.finished_at
            job.error = {"code": "CANCELLED", "message": _MESSAGES[reason]}
            job.emit("error", {**job.error, "retriable": False, "reason": reason})
            metric, action = "cancelled", "cancel_complete"
            human = f"Job {job.job_id} cancelled ({reason}) in phase {job.phase}"
        else:
            code = outcome.error_code if outcome and outcome.error_code else "INTERNAL"
            message = (outcome.error if outcome and outcome.error
                       else "the job failed unexpectedly")
            job.error = {"code": code, "message": message}
            job.emit("error", {**job.error, "retriable": code == "VRAM_OOM", "reason": "engine"})
            metric, action, level = "failed", "error", logging.ERROR
            human = f"Job {job.job_id} failed: {message}"
        job.state = state
        self._record(job)
        # The history keeps a small record; the Job itself (its prompt, outbox and scope) is
        # freed once its stream has been read.
        space = self._space(job.principal)
        space.jobs[job.job_id] = JobRecord.of(job)
        space.finished[job.job_id] = job.finished_mono
        self._trim_history(space)
        self.metrics.requests.labels(outcome=metric).inc()
        if job.started_mono:
            self.metrics.inference_duration.observe(duration)
        if job.counted:
            job.counted = False
            space.active -= 1
            self._mark_active(-1)
        logs.log(action, human, level=level, job_id=job.job_id,
                 correlation_id=job.correlation_id, principal=job.principal, state=state,
                 tokens_out=job.tokens_out, phase=job.phase, cancel_reason=job.cancel_reason,
                 cancelled_by=job.cancelled_by, duration_ms=round(duration * 1000, 3))

    def _record(self, job: Job) -> None:
        """Hand the job's state to the ledger (a non-blocking put; never raises)."""
        if self.ledger is not None:
            self.ledger.record(job.snapshot())

    # -- slots and queue -------------------------------------------------------------

    def _grant(self, job: Job, slot: int) -> None:
        job.slot = slot
        job.slot_granted.set()

    def _release(self, job: Job) -> None:
        """Take the job out of the queue or hand its (already clean) slot to the next job."""
        if job in self._waiting:
            self._waiting.remove(job)
            self._announce_positions()
        if job.slot is None:
            return
        slot, job.slot = job.slot, None
        while self._waiting:
            nxt = self._waiting.pop(0)
            nxt.position = None
            if nxt.active and not nxt.flag.is_set():
                self._grant(nxt, slot)
                self._announce_positions()
                return
        self._free_slots.append(slot)
        self._free_slots.sort()

    def _announce_positions(self) -> None:
        """Tell each waiting job its place, if it changed (CONTRACT §3)."""
        for position, job in enumerate(self._waiting, start=1):
            if job.position != position:
                job.position = position
                job.outbox.set_position(position)

    def _mark_active(self, delta: int) -> None:
        self._n_active += delta
        if self._n_active == 0:
            self._idle.set()
        elif self._idle.is_set():
            self._idle = trio.Event()

    # -- memory ----------------------------------------------------------------------
    # Per principal: ``cancel_memory_max`` tombstones and ``job_history`` finished jobs each.

    def _remember_unknown_cancel(self, space: _Namespace, job_id: str, by: str) -> None:
        """Remember a cancel for an id not seen yet, for ``cancel_memory_s``; at most
        ``cancel_memory_max`` are kept, the oldest dropped first."""
        tombstones = space.tombstones
        tombstones.pop(job_id, None)
        tombstones[job_id] = (trio.current_time() + self.config.cancel_memory_s, by)
        while len(tombstones) > self.config.cancel_memory_max:
            tombstones.popitem(last=False)

    def _forget_expired(self) -> None:
        now = trio.current_time()
        horizon = time.monotonic() - self.config.job_history_s
        for space in self._spaces.values():
            tombstones = space.tombstones
            while tombstones:
                job_id, (expiry, _by) = next(iter(tombstones.items()))
                if expiry > now:
                    break
                del tombstones[job_id]
            while space.finished:
                job_id, finished = next(iter(space.finished.items()))
                if finished >= horizon:
                    break
                self._forget(space, job_id)

    def _trim_history(self, space: _Namespace) -> None:
        while len(space.finished) > self.config.job_history:
            self._forget(space, next(iter(space.finished)))

    def _forget(self, space: _Namespace, job_id: str) -> None:
        del space.finished[job_id]
        entry = space.jobs.get(job_id)
        if entry is not None and not entry.active:
            del space.jobs[job_id]


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """A ledger row as ``GET /jobs/{id}`` shows a job: without the ledger's bookkeeping."""
    return {k: v for k, v in record.items() if k not in ("worker_pid", "updated_at")}


async def _first_of(*events: trio.Event) -> None:
    """Wait until any of ``events`` is set."""

    async def wait(event: trio.Event, done: trio.CancelScope) -> None:
        await event.wait()
        done.cancel()

    async with trio.open_nursery() as nursery:
        for event in events:
            nursery.start_soon(wait, event, nursery.cancel_scope)
