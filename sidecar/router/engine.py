"""RouterEngine: the Engine the front ends call. Local first, the cloud when it pays.

It wraps an inner engine (in the daemon: few-shot Classify over the local pool) and
adds, per request: the routing decision (`policy.decide`, pure), the cloud call
(`cloud.CloudClient`) within the breaker and budget, and the `RouteInfo` every reply
carries. It sees the inner engine through the `Engine` seam only, and config tasks
(their thresholds and labels) through `TaskInfo`. Admin, the supervisor and updates
keep talking to the local engine directly.

Streams are routed before they start (CLOUD_ONLY, pre-routing, or a local failure
before the first token); once local tokens have been sent they are not escalated.

Privacy: the request an escalation would send is built first (`outbound.build`), and
the scan for personal data reads all of it (labels and schema included) for the
decision; the cloud client checks the final payload once more before sending. Budget:
each escalation reserves its worst-case cost before calling and settles after, so
concurrent requests cannot spend past a cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import asdict, replace
from functools import partial
from typing import Literal, Protocol

from sidecar.config import CloudConfig, TaskConfig
from sidecar.domain.admin import CloudReport, ShadowAgreement, ShadowReport
from sidecar.domain.errors import (
    ContextOverflow,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidRequest,
    Overloaded,
    SchemaViolation,
    SidecarError,
    Unavailable,
)
from sidecar.domain.seam import DEFAULT_ROUTE, Engine, EngineWrapper
from sidecar.domain.types import (
    ChatTask,
    Classification,
    ClassifyTask,
    EmbedTask,
    Extraction,
    ExtractTask,
    FinishReason,
    GenerateTask,
    Generation,
    LabelScore,
    Result,
    RouteInfo,
    RouteRequest,
    StreamableTask,
    Task,
    TokenConfidence,
    TokenEvent,
    Usage,
)
from sidecar.router.breaker import Breaker
from sidecar.router.budget import Budget, Reservation
from sidecar.router.cloud import NONE, CloudClient, CloudError, CloudReply, Meter
from sidecar.router.deadline import low_priority
from sidecar.router.fitted import FittedThresholds, config_threshold
from sidecar.router.fitted import key as fitted_key
from sidecar.router.outbound import Gate, Outbound, SensitiveData, build, estimate
from sidecar.router.policy import Decision, FailKind, LocalOutcome, Situation, decide
from sidecar.router.shadow import AFTER_REPLY_S, IN_FLIGHT, Shadow, agree, answer
from sidecar.router.shadow_loop import ShadowLoop
from sidecar.validate import checked_schema, conforming_json_async

log = logging.getLogger("sidecar.router")

FAIL = {
    "unavailable": Unavailable,
    "overloaded": Overloaded,
    "failed_precondition": FailedPrecondition,
}


def failure_kind(e: SidecarError) -> str | None:
    """The local failures AUTO may escalate; None: the request itself is wrong."""
    if isinstance(e, Overloaded):
        return "overloaded"
    if isinstance(e, DeadlineExceeded):
        return "timeout"
    if isinstance(e, Unavailable):
        return "unavailable"
    if isinstance(e, ContextOverflow):  # a bigger cloud model may take it
        return "context"
    if isinstance(e, SchemaViolation):
        return "schema"
    return None


# Schemas up to this size are checked in microseconds; bigger new ones go to a thread.
SCHEMA_OFF_LOOP_CHARS = 2048


class TaskInfo(Protocol):
    """What the router reads about the config tasks a Classify may name."""

    @property
    def progress(self) -> Mapping[str, str]:
        """Task name -> how far preparing it has got (for `sidecar status`)."""
        ...

    def threshold(self, task: str) -> float | None:
        """The task's own confidence threshold; None: use cloud.classify_threshold."""
        ...

    def target_accuracy(self, task: str) -> float | None:
        """tasks.NAME.target_accuracy: choose the threshold from shadow traffic; None: off."""
        ...

    def label_names(self, task: str) -> list[str]:
        """The task's labels; empty while they are not known yet."""
        ...

    def adapter(self, task: str) -> str:
        """The LoRA adapter the task answers with (tasks.NAME.adapter); "" = none."""
        ...

    def retune(self, tasks: tuple[TaskConfig, ...]) -> None:
        """SIGHUP: take the new thresholds."""
        ...


class NoTasks:
    """TaskInfo when nothing below the router answers Classify by task."""

    progress: Mapping[str, str] = {}

    def threshold(self, task: str) -> float | None:
        return None

    def target_accuracy(self, task: str) -> float | None:
        return None

    def label_names(self, task: str) -> list[str]:
        return []

    def adapter(self, task: str) -> str:
        return ""

    def retune(self, tasks: tuple[TaskConfig, ...]) -> None:
        pass


class RouterEngine(EngineWrapper):
    """Local first, the cloud when it pays: an engine wrapping `inner`. Its parts (breaker,
    budget, privacy gate, cloud client) are built by the composition root and handed in."""

    def __init__(
        self,
        inner: Engine,
        settings: CloudConfig,
        *,
        breaker: Breaker,
        budget: Budget,
        gate: Gate,
        cloud: CloudClient | None,
        tasks: TaskInfo | None = None,
        fitted: FittedThresholds | None = None,
        shadow: Shadow | None = None,
        on_route: Callable[[Result, str], None] = lambda _r, _c: None,
    ) -> None:
        super().__init__(inner)
        self.tasks: TaskInfo = tasks if tasks is not None else NoTasks()
        self.fitted = fitted  # thresholds fitted by `sidecar eval`, over the config's
        self.settings = settings  # read per request: SIGHUP replaces it
        self.on_route = on_route  # metrics hook: (result, reason code)
        self.breaker = breaker
        self.budget = budget
        self.gate = gate  # shared with the cloud client: every outbound request passes it
        self.cloud = cloud
        self.cloud_calls = 0
        self.shadow = shadow
        self._shadows: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references
        self._shadow_loop = ShadowLoop()  # where shadow calls meet the cloud (not this loop)
        self._shadow_cloud: CloudClient | None = None  # their client, used on that loop only

    # ------------------------------------------------------------------ status

    @property
    def breaker_state(self) -> str:
        return self.breaker.state

    @property
    def breaker_opened(self) -> int:
        return self.breaker.opened

    @property
    def spent(self) -> tuple[float, float]:
        self.budget.spent()  # rolls the periods over
        return self.budget.spent_day, self.budget.spent_month

    # ------------------------------------------------------------------ Engine

    async def close(self) -> None:
        for t in list(self._shadows):
            t.cancel()
        await asyncio.gather(*self._shadows, return_exceptions=True)
        if self.shadow is not None:
            await asyncio.to_thread(self.shadow.flush)
        twin, self._shadow_cloud = self._shadow_cloud, None
        await self._shadow_loop.close(twin.close() if twin is not None else None)
        if self.cloud is not None:
            await self.cloud.close()
        await self.inner.close()

    async def run(
        self,
        model: str,
        task: Task,
        caller: str,
        route: RouteRequest = DEFAULT_ROUTE,
        *,
        background: bool = False,
    ) -> Result:
        if isinstance(task, EmbedTask):  # vectors are model-specific: always local
            return await self._local(model, task, caller, background)
        await self._check(model, task)
        situation, out = await self._situation(task, route)
        first = decide(situation)
        if first.action == "fail":
            raise _refused(first)
        if first.action == "cloud":
            return await self._cloud(task, first, None, None, out)
        try:
            result = await self._local_within_budget(model, task, caller, situation, background)
        except SidecarError as e:
            kind = failure_kind(e)
            if kind is None:
                raise
            second = decide(replace(situation, local=LocalOutcome(failure=kind, detail=e.message)))
            if second.action == "fail":
                raise _again(e, second.reason, second.cause) from None
            if second.action == "keep_local":  # LOCAL_ONLY: the error stands
                raise
            log.info("escalating: %s", second.reason)
            return await self._cloud(task, second, None, e, out)
        self._scope(task, result)
        outcome = self._outcome(task, result)
        second = decide(replace(situation, local=outcome))
        if second.action == "cloud":
            return await self._cloud(task, second, result, None, out)
        reply = self._finish(result, _route("local", second.reason, outcome, code=second.code))
        self._shadow(task, result, situation, out, outcome)
        return reply

    async def stream(
        self, model: str, task: StreamableTask, caller: str, route: RouteRequest = DEFAULT_ROUTE
    ) -> AsyncGenerator[TokenEvent | Generation, None]:
        await self._check(model, task)
        situation, out = await self._situation(task, route)
        first = decide(situation)
        if first.action == "fail":
            raise _refused(first)
        if first.action == "cloud":
            result = await self._cloud(task, first, None, None, out)
            assert isinstance(result, Generation)
            yield TokenEvent(result.text)
            yield result
            return
        started = False
        try:
            async for event in self.inner.stream(model, task, caller):
                started = True
                if isinstance(event, Generation):
                    event.route = _route("local", "", self._outcome(task, event))
                    self.on_route(event, "")
                yield event
        except SidecarError as e:
            kind = failure_kind(e)
            if started or kind is None:
                raise
            second = decide(replace(situation, local=LocalOutcome(failure=kind, detail=e.message)))
            if second.action != "cloud":
                raise _again(e, second.reason or e.message, second.cause) from None
            result = await self._cloud(task, second, None, e, out)
            assert isinstance(result, Generation)
            yield TokenEvent(result.text)
            yield result

    # ------------------------------------------------------------------ local

    async def _local_within_budget(
        self, model: str, task: Task, caller: str, situation: Situation, background: bool
    ) -> Result:
        limit = self.settings.local_timeout_seconds
        timed = bool(limit) and situation.routing == "AUTO"
        if not timed and not background:
            return await self._local(model, task, caller, background)
        try:
            # Cancelling frees the worker within a token (the pool cancels the job).
            if background:  # a caller's PRIORITY_LOW: timed from dispatch (router/deadline.py)
                work = partial(self._local, model, task, caller, background)
                return await low_priority(work, limit if timed else None)
            return await asyncio.wait_for(self._local(model, task, caller, background), limit)
        except asyncio.TimeoutError:  # not the builtin on 3.10
            raise DeadlineExceeded(
                f"the local model took longer than cloud.local_timeout_seconds ({limit:g}s)"
            ) from None

    async def _local(self, model: str, task: Task, caller: str, background: bool = False) -> Result:
        return await self.inner.run(model, task, caller, background=background)

    def _scope(self, task: Task, result: Result) -> None:
        """A zero-shot Classify (labels alone) is out of scope past cloud.classify_none_novelty
        (by examples or by task, the engine that answered set it by its own calibration);
        with allow_none an out-of-scope answer names no label."""
        if not isinstance(result, Classification) or not isinstance(task, ClassifyTask):
            return
        cut = self.settings.classify_none_novelty
        zero_shot = not (task.examples or task.task)
        if zero_shot and cut and result.novelty is not None and result.novelty >= cut:
            result.out_of_scope = True
        if task.allow_none and result.out_of_scope:
            result.label = ""

    def _threshold(
        self, kind: str, task: str, result: Result, examples: bool = False
    ) -> tuple[float, str]:
        """The threshold a local answer is compared with, and where it came from: one chosen
        from shadow traffic (tasks.NAME.target_accuracy, once there are samples enough), else
        a value fitted by `sidecar eval --fit-threshold` on the model version that answered,
        else the task's own, else the config's."""
        ref = result.model
        version = f"{ref.name}@{ref.version}" if ref else ""
        name = fitted_key(kind, task=task, model=ref.name if ref else "", examples=examples)
        target = self.tasks.target_accuracy(task) if task else None
        if name is not None and target is not None and self.shadow is not None:
            chosen = self.shadow.recalibrated(name, version, target)
            if chosen is not None:
                return chosen.threshold, chosen.describe()
        if name is not None and self.fitted is not None:
            got = self.fitted.get(name, version)
            if got is not None:
                return got.threshold, got.describe(name)
        own = self.tasks.threshold(task) if task else None
        return config_threshold(kind, self.settings, task, own)

    def _outcome(self, task: Task, result: Result) -> LocalOutcome:
        c = self.settings
        if isinstance(result, Classification):
            by_task = task.task if isinstance(task, ClassifyTask) else ""
            examples = isinstance(task, ClassifyTask) and bool(task.examples)
            threshold, source = self._threshold("classify", by_task, result, examples)
            scope = LocalOutcome(out_of_scope=result.out_of_scope, novelty=result.novelty)
            if c.classify_margin and result.margin < c.classify_margin:
                return replace(scope, confidence=result.margin, threshold=c.classify_margin,
                               measure="margin", source="cloud.classify_margin")  # fmt: skip
            return replace(scope, confidence=result.top_probability, threshold=threshold,
                           measure="top probability", source=source)  # fmt: skip
        if isinstance(result, Extraction):
            threshold, source = self._threshold("extract", "", result)
            lp = result.confidence.mean_logprob
            return LocalOutcome(None, lp, threshold, "mean logprob", source)
        if isinstance(result, Generation):
            conf = result.confidence
            if conf.min_logprob < c.generate_min_logprob:
                return LocalOutcome(None, conf.min_logprob, c.generate_min_logprob, "min logprob",
                                    "cloud.generate_min_logprob")  # fmt: skip
            return LocalOutcome(None, conf.mean_logprob, c.generate_mean_logprob, "mean logprob",
                                "cloud.generate_mean_logprob")  # fmt: skip
        return LocalOutcome()

    # ------------------------------------------------------------------ policy inputs

    async def _check(self, model: str, task: Task) -> None:
        """Bound the request before anything is decided, so a CLOUD_ONLY request gets the
        same INVALID_ARGUMENT as a local one, and nothing unbounded (a 500-deep schema, a
        pattern RE2 refuses) reaches the outbound builder or the cloud. Classify by
        examples or by task is checked by the engine that answers it."""
        if isinstance(task, ExtractTask) and len(task.schema) > SCHEMA_OFF_LOOP_CHARS:
            # A new big schema costs up to ~0.2 s to bound and check: off the event loop.
            # The result is cached, so the checks below (and the pool's) find it there.
            await asyncio.to_thread(checked_schema, task.schema)
        with contextlib.suppress(ContextOverflow):  # too big here; a cloud model may take it
            self.inner.check(model, task)

    async def _situation(
        self, task: Task, route: RouteRequest
    ) -> tuple[Situation, Outbound | None]:
        """What decide() needs, and the request an escalation would send (None: not
        known yet, e.g. the labels of a task still being prepared)."""
        routing = route.routing or self.settings.routing
        adapter = "" if isinstance(task, EmbedTask) else task.adapter
        if not adapter and isinstance(task, ClassifyTask) and task.task:
            adapter = self.tasks.adapter(task.task)  # a config task's own
        if adapter:
            # A LoRA adapter is this machine's: a cloud model would answer without it.
            if routing == "CLOUD_ONLY":
                raise FailedPrecondition(
                    f"adapter {adapter!r} runs only on this machine: use routing AUTO or "
                    "LOCAL_ONLY (a cloud model would answer without it)"
                )
            routing = "LOCAL_ONLY"
        if self.cloud is None or routing == "LOCAL_ONLY":
            # Nothing can leave: scanning for personal data and pre-routing would be
            # request-path work whose answer decide() never reads.
            return Situation(routing=routing, cloud=self.cloud is not None), None
        texts = _texts(task)
        try:
            out: Outbound | None = self._outbound(task)
        except FailedPrecondition:
            out = None
        # The scan reads the request as it would leave, every field of it.
        kinds = tuple(
            await self.gate.kinds_async(out) if out is not None else self.gate.scanner.kinds(texts)
        )
        return Situation(
            routing=routing,
            sensitive=("marked", *kinds) if route.sensitive else kinds,
            redact=self.gate.redact,
            breaker_open=self.breaker.state == "open",
            spent=self.budget.spent(),
            pre_route=self._pre_route(task, texts),
        ), out

    def _outbound(self, task: Task) -> Outbound:
        if isinstance(task, ClassifyTask):
            return build(task, task.labels or tuple(self._labels_of(task)))
        return build(task)

    def _pre_route(self, task: Task, texts: list[str]) -> str | None:
        c = self.settings
        if task.kind in c.pre_route_tasks:
            return f"{task.kind} requests go to the cloud (cloud.pre_route_tasks)"
        size = sum(len(t) for t in texts)
        if c.pre_route_max_chars and size > c.pre_route_max_chars:
            return f"{size} characters > cloud.pre_route_max_chars {c.pre_route_max_chars}"
        low = " ".join(texts).lower()
        for word in c.pre_route_keywords:
            if word.lower() in low:
                return f"keyword {word!r} (cloud.pre_route_keywords)"
        return None

    # ------------------------------------------------------------------ shadow

    def _shadow(
        self,
        task: Task,
        local: Result,
        situation: Situation,
        out: Outbound | None,
        outcome: LocalOutcome,
    ) -> None:
        """Maybe ask the cloud the same question after the reply has gone. Never awaits:
        the reply leaves as soon as run() returns, whatever the cloud does."""
        sh = self.shadow
        if (
            sh is None
            or self.cloud is None
            or out is None
            or situation.routing != "AUTO"
            or situation.sensitive  # a finding or the caller's mark: never, not even redacted
            or not isinstance(task, ClassifyTask | ExtractTask)
            or self.breaker.state == "open"
            or local.model is None
            or not sh.wanted()
        ):
            return
        kind = "classify" if isinstance(task, ClassifyTask) else "extract"
        by_task = task.task if isinstance(task, ClassifyTask) else ""
        examples = isinstance(task, ClassifyTask) and bool(task.examples)
        key = fitted_key(kind, task=by_task, model=local.model.name, examples=examples)
        if key is None:  # inline examples: no key their agreement could be kept under
            return
        if sh.in_flight >= IN_FLIGHT:
            sh.counts.dropped += 1
            return
        held = sh.budget.reserve(*estimate(out))
        if isinstance(held, str):
            sh.counts.capped += 1
            return
        sh.in_flight += 1
        model = f"{local.model.name}@{local.model.version}"
        job = asyncio.create_task(self._shadow_call(sh, task, out, local, held, key, model,
                                                    outcome.confidence))  # fmt: skip
        self._shadows.add(job)
        job.add_done_callback(self._shadows.discard)

    async def _shadow_call(
        self,
        sh: Shadow,
        task: Task,
        out: Outbound,
        local: Result,
        held: Reservation,
        key: str,
        model: str,
        confidence: float | None,
    ) -> None:
        meter = Meter()
        try:
            # run() has returned, but the front end has not written the reply yet: building
            # the cloud request now would take the event loop from it first.
            await asyncio.sleep(AFTER_REPLY_S)
            if self._shadow_cloud is None:
                assert self.cloud is not None  # _shadow() starts none without one
                self._shadow_cloud = self.cloud.twin()
            try:
                ask = self._ask(task, out, meter, self._shadow_cloud)
                cloud, _ = await self._shadow_loop.run(ask)
            except (CloudError, SensitiveData, _InvalidCloudAnswer) as e:
                sh.counts.failed += 1
                log.info("shadow call failed: %s", e)
                return
            finally:
                # Settled here, without yielding (the next reserve sees it); written in a
                # thread: an fsync on the loop would hold up the replies being served.
                cost = sh.budget.settle(
                    held, meter.prompt_tokens, meter.completion_tokens, answered=meter.calls
                )
                if cost:
                    await asyncio.to_thread(sh.save_budget, sh.budget.state())
            sh.counts.sent += 1
            text = self.gate.scanner.redact_all([out.text])[0]
            row = {"key": key, "model": model, "text": text, "local": answer(local),
                   "cloud": answer(cloud), "confidence": confidence}  # fmt: skip
            await asyncio.to_thread(sh.record, key, model, agree(local, cloud), confidence, row)
        except asyncio.CancelledError:
            raise
        except Exception:  # a background task: nobody else would see it
            log.exception("shadow call")
        finally:
            sh.in_flight -= 1

    # ------------------------------------------------------------------ cloud

    async def _cloud(
        self,
        task: Task,
        d: Decision,
        local: Result | None,
        local_error: SidecarError | None,
        out: Outbound | None,
    ) -> Result:
        assert self.cloud is not None  # decide() never escalates without a cloud
        conf = self._outcome(task, local) if local is not None else LocalOutcome()
        redact_it = d.redact
        if out is None:  # not known when decide() ran: scan it now, by the same rule
            out = self._outbound(task)
            kinds = await self.gate.kinds_async(out)
            if kinds and not self.gate.redact:
                why = f"sensitive data ({', '.join(kinds)}) never leaves the machine"
                return self._blocked(d, why, "failed_precondition", local, local_error, conf,
                                     "sensitive")  # fmt: skip
            redact_it = bool(kinds)
        if redact_it:
            out = self.gate.redacted(out)
        held = self.budget.reserve(*estimate(out))
        if isinstance(held, str):  # calls in flight took the room since decide() ran
            why = f"the {held} cloud budget is spent"
            return self._blocked(d, why, "overloaded", local, local_error, conf)
        meter = Meter()
        try:
            result, reply = await self._ask(task, out, meter)
        except SensitiveData as e:  # the client's last check: nothing was sent
            return self._blocked(d, str(e), "failed_precondition", local, local_error, conf,
                                 "sensitive")  # fmt: skip
        except CloudError as e:
            why = f"{d.reason}; the cloud failed: {e.message}"
            log.warning("escalation failed: %s", why)
            if local is not None:  # an unsure local answer beats none
                return self._finish(local, _route("local", why, conf, code="cloud_failed"))
            if local_error is not None:
                raise _again(local_error, f"{local_error.message}; {why}") from None
            raise Unavailable(why) from None
        except _InvalidCloudAnswer as e:
            why = f"{d.reason}; {e}"
            if local is not None:
                return self._finish(local, _route("local", why, conf, code="cloud_invalid"))
            raise FailedPrecondition(why) from None
        finally:  # what the calls cost, whatever became of their answers
            cost = self.budget.settle(
                held, meter.prompt_tokens, meter.completion_tokens, answered=meter.calls
            )
        self.cloud_calls += 1
        route = _route("cloud", d.reason, conf, reply.latency_ms, cost, d.code)
        return self._finish(result, route)

    def _blocked(
        self,
        d: Decision,
        why: str,
        fail: FailKind,
        local: Result | None,
        local_error: SidecarError | None,
        conf: LocalOutcome,
        cause: str = "",
    ) -> Result:
        """Escalation found blocked at the last moment: as decide() would have ruled."""
        reason = f"{d.reason}; escalation blocked: {why}" if d.reason else why
        if local is not None:
            return self._finish(local, _route("local", reason, conf, code="blocked"))
        if local_error is not None:
            raise _again(local_error, f"{local_error.message}; escalation blocked: {why}", cause)
        raise _refused(Decision("fail", why, fail, cause=cause))

    async def _ask(
        self, task: Task, out: Outbound, meter: Meter, client: CloudClient | None = None
    ) -> tuple[Result, CloudReply]:
        """The cloud's answer to `task`, through `client` (the shadow calls' own), else the
        router's client."""
        cloud = client or self.cloud
        assert cloud is not None
        if isinstance(task, ClassifyTask):
            labels = out.originals
            label, reply = await cloud.ask_label(out, meter)
            if label is None:
                raise _InvalidCloudAnswer(
                    f"the cloud named none of the labels twice (last answer {reply.text[:80]!r})"
                )
            usage = Usage(reply.prompt_tokens, reply.completion_tokens)
            if label == NONE:  # "none of these", offered only with allow_none
                none = tuple(LabelScore(x, 0.0, float("-inf")) for x in labels)
                return Classification("", none, usage, out_of_scope=True), reply
            others = [LabelScore(x, 0.0, float("-inf")) for x in labels if x != label]
            return Classification(label, (LabelScore(label, 1.0, 0.0), *others), usage), reply
        if isinstance(task, ExtractTask):
            reply = await cloud.ask_json(out, meter)
            try:
                text = await conforming_json_async(reply.text, task.schema)
            except SchemaViolation as e:
                raise _InvalidCloudAnswer(
                    f"the cloud's JSON does not satisfy the schema: {e.message}"
                ) from None
            return Extraction(
                text, Usage(reply.prompt_tokens, reply.completion_tokens), TokenConfidence(0.0, 0.0)
            ), reply
        if isinstance(task, GenerateTask | ChatTask):
            reply = await cloud.chat(out.render(), max_tokens=out.max_tokens, meter=meter)
            finish: FinishReason = "length" if reply.finish_reason == "length" else "stop"
            return Generation(
                reply.text,
                finish,
                Usage(reply.prompt_tokens, reply.completion_tokens),
                TokenConfidence(0.0, 0.0),
            ), reply
        raise InvalidRequest(f"{task.kind} requests are never sent to the cloud")

    def _labels_of(self, task: ClassifyTask) -> list[str]:
        if task.examples:
            return list(dict.fromkeys(y for _, y in task.examples))
        names = self.tasks.label_names(task.task)
        if not names:
            raise FailedPrecondition(
                f"task {task.task!r} is not loaded yet, so its labels are not known"
            )
        return names

    def _finish(self, result: Result, route: RouteInfo) -> Result:
        result.route = route
        self.on_route(result, route.code)
        return result

    def cloud_report(self) -> CloudReport:
        """The cloud's settings and state, for `sidecar status`."""
        c, b = self.settings, self.budget
        spent_day, spent_month = self.spent
        return CloudReport(
            configured=self.cloud is not None,
            base_url=c.base_url,
            model=c.model,
            routing=c.routing,
            breaker=self.breaker.state,
            spent_day=spent_day,
            spent_month=spent_month,
            daily_cap=b.daily_cap,
            monthly_cap=b.monthly_cap,
            calls=self.cloud_calls,
            tasks=dict(self.tasks.progress),
            thresholds_file=str(self.fitted.path) if self.fitted is not None else "",
            fitted=self.fitted.report() if self.fitted is not None else {},
            shadow=self._shadow_report(),
        )

    def _shadow_report(self) -> ShadowReport | None:
        sh = self.shadow
        if sh is None or self.cloud is None:
            return None
        sh.budget.spent()  # rolls the day over
        agreement = tuple(ShadowAgreement(p.key, p.model, p.agreed, p.total, *p.interval())
                          for p in sh.report())  # fmt: skip
        chosen = {}
        for p in sh.report():
            name = p.key.removeprefix("task:")
            target = self.tasks.target_accuracy(name) if p.key.startswith("task:") else None
            if target is not None:
                chosen[f"{p.key} ({p.model})"] = sh.explain(p.key, p.model, target)
        return ShadowReport(sh.rate, sh.budget.daily_cap, sh.budget.spent_day,
                            sh.budget.spent_month, asdict(sh.counts), agreement,
                            str(sh.directory), chosen)  # fmt: skip


def _refused(d: Decision) -> SidecarError:
    """The error for a request decide() refuses, carrying why in one word."""
    e = FAIL[d.fail or "unavailable"](d.reason)
    e.cause = d.cause
    return e


def _again(e: SidecarError, message: str, cause: str = "") -> SidecarError:
    """The local error again with a longer message, still carrying why escalation was
    refused (trailing metadata sidecar-cause): a caller acts on that word, not the text."""
    again = type(e)(message)
    again.cause = cause or e.cause
    return again


def _route(
    served_by: Literal["local", "cloud"],
    reason: str,
    outcome: LocalOutcome,
    latency_ms: float = 0.0,
    cost: float = 0.0,
    code: str = "",
) -> RouteInfo:
    """The reply's route, with the threshold the local answer was held to (if any)."""
    compared = outcome.confidence is not None
    return RouteInfo(served_by, reason, outcome.confidence, latency_ms, cost, code,
                     outcome.threshold if compared else None,
                     outcome.source if compared else "")  # fmt: skip


class _InvalidCloudAnswer(Exception):
    """The cloud answered, but not within the request's contract."""


def _texts(task: Task) -> list[str]:
    """The caller's own text in a request, for pre-routing (size and keywords)."""
    if isinstance(task, GenerateTask):
        return [task.prompt]
    if isinstance(task, ChatTask):
        return [m.content for m in task.messages]
    if isinstance(task, ClassifyTask):
        return [task.text, task.instruction]
    if isinstance(task, ExtractTask):
        return [task.text, task.instruction]
    return []
