"""protobuf <-> domain: the only module that knows both sides."""

from __future__ import annotations

from sidecar import __version__
from sidecar.domain.admin import (
    CloudReport,
    ModelReport,
    ResidencyChange,
    ShadowReport,
    StatusReport,
    StoredVersion,
    StoreListing,
)
from sidecar.domain.errors import InvalidRequest
from sidecar.domain.status import SwapResult
from sidecar.domain.types import (
    ChatMessage,
    ChatTask,
    Classification,
    ClassifyTask,
    Embeddings,
    EmbedTask,
    Extraction,
    ExtractTask,
    GenerateTask,
    Generation,
    ModelRef,
    RouteInfo,
    RouteRequest,
    Routing,
    Sampling,
    TokenConfidence,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from sidecar.domain.types import Timings as DomainTimings
from sidecar.domain.updates import Check, Outcome, Rollout
from sidecar.v1 import inference_pb2 as pb

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
ROUTING: dict[int, Routing] = {
    pb.ROUTING_UNSPECIFIED: "",
    pb.ROUTING_AUTO: "AUTO",
    pb.ROUTING_LOCAL_ONLY: "LOCAL_ONLY",
    pb.ROUTING_CLOUD_ONLY: "CLOUD_ONLY",
}


# ---------------------------------------------------------------- requests


def _max_tokens(r: pb.GenerateRequest | pb.ChatRequest | pb.ExtractRequest) -> int | None:
    return r.max_tokens or None  # unset and 0 both mean the server default (see the proto)


def sampling(s: pb.Sampling) -> Sampling:
    return Sampling(
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        top_k=s.top_k,
        seed=s.seed,
        repeat_penalty=s.repeat_penalty or 1.0,
        stop=tuple(s.stop),
    )


def generate_task(r: pb.GenerateRequest) -> GenerateTask:
    return GenerateTask(
        prompt=r.prompt,
        max_tokens=_max_tokens(r),
        sampling=sampling(r.sampling),
        logprobs=r.logprobs,
        top_logprobs=r.top_logprobs,
        adapter=r.adapter,
    )


def chat_task(r: pb.ChatRequest) -> ChatTask:
    return ChatTask(
        messages=tuple(ChatMessage(m.role, m.content) for m in r.messages),
        max_tokens=_max_tokens(r),
        sampling=sampling(r.sampling),
        logprobs=r.logprobs,
        top_logprobs=r.top_logprobs,
        adapter=r.adapter,
    )


def classify_task(r: pb.ClassifyRequest) -> ClassifyTask:
    return ClassifyTask(
        text=r.text,
        labels=tuple(r.labels),
        instruction=r.instruction,
        examples=tuple((e.text, e.label) for e in r.examples),
        task=r.task,
        allow_none=r.allow_none,
        adapter=r.adapter,
    )


def route_request(
    r: pb.GenerateRequest | pb.ChatRequest | pb.ClassifyRequest | pb.ExtractRequest,
) -> RouteRequest:
    routing = ROUTING.get(r.routing)
    if routing is None:  # a newer client's value this daemon does not know
        raise InvalidRequest(
            f"routing {r.routing} is not known (use AUTO, LOCAL_ONLY or CLOUD_ONLY)"
        )
    return RouteRequest(routing, r.sensitive)


LowRequest = pb.GenerateRequest | pb.ChatRequest | pb.ClassifyRequest | pb.ExtractRequest


def low_priority(r: LowRequest) -> bool:
    """PRIORITY_LOW: the request waits in the pool's background lane."""
    if r.priority not in (pb.PRIORITY_UNSPECIFIED, pb.PRIORITY_LOW):
        raise InvalidRequest(f"priority {r.priority} is not known (use LOW or leave it unset)")
    return r.priority == pb.PRIORITY_LOW


def normal_priority(r: pb.GenerateRequest | pb.ChatRequest) -> None:
    """Streams run at normal priority: a LOW one is refused rather than quietly run as live
    work, which its caller asked it not to be."""
    if low_priority(r):
        raise InvalidRequest(
            "priority LOW is for unary Generate and Chat; a stream runs at normal priority "
            "(leave priority unset, or call Generate/Chat)"
        )


def extract_task(r: pb.ExtractRequest) -> ExtractTask:
    return ExtractTask(
        text=r.text,
        schema=r.json_schema,
        instruction=r.instruction,
        max_tokens=_max_tokens(r),
        adapter=r.adapter,
    )


def embed_task(r: pb.EmbedRequest) -> EmbedTask:
    return EmbedTask(texts=tuple(r.texts), normalize=r.normalize)


# ---------------------------------------------------------------- replies


def _model(ref: ModelRef | None) -> pb.ModelRef:
    return pb.ModelRef(name=ref.name, version=ref.version) if ref else pb.ModelRef()


def _adapter(ref: ModelRef | None) -> pb.ModelRef | None:
    return _model(ref) if ref else None  # unset: no adapter answered


def _usage(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens)


def _timings(t: DomainTimings) -> pb.Timings:
    return pb.Timings(queue_ms=t.queue_ms, first_token_ms=t.first_token_ms, total_ms=t.total_ms)


def _confidence(c: TokenConfidence) -> pb.TokenConfidence:
    return pb.TokenConfidence(mean_logprob=c.mean_logprob, min_logprob=c.min_logprob)


def _logprobs(items: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token=t.token,
            bytes=t.bytes,
            logprob=t.logprob,
            top_logprobs=[
                pb.TopLogprob(token=a.token, bytes=a.bytes, logprob=a.logprob) for a in t.top
            ],
        )
        for t in items
    ]


def route(r: RouteInfo) -> pb.RouteInfo:
    out = pb.RouteInfo(
        served_by=r.served_by,
        reason=r.reason,
        cloud_latency_ms=r.cloud_latency_ms,
        cost=r.cost,
        reason_code=r.code,
    )
    if r.local_confidence is not None:
        out.local_confidence = r.local_confidence
    if r.threshold is not None:
        out.threshold = r.threshold
    out.threshold_source = r.threshold_source
    return out


def generate_reply(g: Generation) -> pb.GenerateReply:
    return pb.GenerateReply(
        text=g.text,
        finish_reason=FINISH[g.finish_reason],
        model=_model(g.model),
        usage=_usage(g.usage),
        timings=_timings(g.timings),
        confidence=_confidence(g.confidence),
        route=route(g.route),
        logprobs=_logprobs(g.logprobs),
        adapter=_adapter(g.adapter),
    )


def chunk(event: TokenEvent) -> pb.GenerateChunk:
    return pb.GenerateChunk(text=event.text, logprobs=_logprobs(event.logprobs))


def final_chunk(g: Generation) -> pb.GenerateChunk:
    return pb.GenerateChunk(summary=generate_reply(g))


def classify_reply(c: Classification) -> pb.ClassifyReply:
    return pb.ClassifyReply(
        label=c.label,
        scores=[
            pb.LabelScore(label=s.label, probability=s.probability, logprob=s.logprob)
            for s in c.scores
        ],
        confidence=pb.ClassifyConfidence(top_probability=c.top_probability, margin=c.margin),
        model=_model(c.model),
        usage=_usage(c.usage),
        timings=_timings(c.timings),
        route=route(c.route),
        out_of_scope=c.out_of_scope,
        novelty=c.novelty,
        adapter=_adapter(c.adapter),
    )


def extract_reply(e: Extraction) -> pb.ExtractReply:
    return pb.ExtractReply(
        json=e.json,
        model=_model(e.model),
        usage=_usage(e.usage),
        timings=_timings(e.timings),
        confidence=_confidence(e.confidence),
        route=route(e.route),
        adapter=_adapter(e.adapter),
    )


def embed_reply(e: Embeddings) -> pb.EmbedReply:
    return pb.EmbedReply(
        embeddings=[pb.Embedding(values=v) for v in e.vectors],
        model=_model(e.model),
        usage=_usage(e.usage),
        timings=_timings(e.timings),
    )


def model_status(m: ModelReport) -> pb.ModelStatus:
    s, probe_error = m.pool, m.probe_error
    return pb.ModelStatus(
        model=_model(s.model),
        path=str(s.path),
        context=s.context,
        threads=s.threads,
        workers=[
            pb.WorkerStatus(pid=w.pid or 0, state=w.state, requests=w.requests, rss_bytes=rss or 0)
            for w, rss in zip(s.workers, s.rss, strict=True)
        ],
        queue_depth=s.queue_depth,
        queue_limit=s.queue_limit,
        ready=s.ready and not probe_error,
        detail=s.detail or (probe_error or ""),
        is_default=m.is_default,
        restarts=s.restarts,
        last_swap=s.last_swap,
        backoff_s=s.backoff_s,
        last_error=s.last_error or (probe_error or ""),
        last_update=m.last_update,
        update_fetch=m.update_fetch,
        state=s.state,
        on_demand=s.on_demand,
        in_flight=s.in_flight,
        idle_s=s.idle_s,
        unload_in_s=s.unload_in_s,
        footprint_bytes=s.footprint,
        rollout=_rollout(m.rollout),
        last_rollback=m.last_rollback,
        adapters=[
            pb.AdapterStatus(
                name=a.name,
                version=a.version,
                last_update=a.last_update,
                last_rollback=a.last_rollback,
                not_fitting=a.not_fitting,
            )
            for a in m.adapters
        ],
    )


def residency_reply(r: ResidencyChange) -> pb.ResidencyReply:
    return pb.ResidencyReply(model=model_status(r.model), changed=r.changed, seconds=r.seconds)


def status_reply(r: StatusReport) -> pb.StatusReply:
    return pb.StatusReply(
        cloud=cloud_status(r.cloud) if r.cloud is not None else None,
        last_reload=r.last_reload,
        memory_available_bytes=r.memory_available,
        shedding=r.shedding,
        version=__version__,
        pid=r.pid,
        uptime_s=r.uptime_s,
        socket=r.socket,
        models=[model_status(m) for m in r.models],
        counters=r.counters,
        drop_watcher=r.drop_watcher,
    )


def swap_progress(
    stage: str, detail: str, done: int, total: int, elapsed_ms: float
) -> pb.SwapProgress:
    return pb.SwapProgress(stage=stage, detail=detail, elapsed_ms=elapsed_ms)


def swap_done(result: SwapResult, elapsed_ms: float) -> pb.SwapProgress:
    return pb.SwapProgress(
        stage="done",
        detail=f"{result.new.name} serves {result.new.version}{result.misfit_note()}",
        finished=True,
        ok=True,
        old=_model(result.old),
        new=_model(result.new),
        elapsed_ms=elapsed_ms,
        adapters_not_fitting=result.adapters_not_fitting,
    )


def _rollout(r: Rollout | None) -> pb.Rollout | None:
    if r is None:
        return None
    return pb.Rollout(version=r.version, fraction=r.fraction, position=r.position,
                      in_cohort=r.in_cohort, identity=r.identity)  # fmt: skip


def update_check(c: Check) -> pb.UpdateCheck:
    return pb.UpdateCheck(
        model=c.model,
        installed_version=c.installed_version,
        available_version=c.available_version,
        update_available=c.update_available,
        plan=c.plan_text,
        download_bytes=c.download_bytes,
        full_bytes=c.full_bytes,
        detail=c.detail,
        rollout=_rollout(c.rollout),
    )


def update_progress(
    stage: str, detail: str, done: int, total: int, elapsed_ms: float
) -> pb.UpdateProgress:
    return pb.UpdateProgress(
        stage=stage, detail=detail, done_bytes=done, total_bytes=total, elapsed_ms=elapsed_ms
    )


def update_done(o: Outcome, elapsed_ms: float) -> pb.UpdateProgress:
    detail = f"{o.model} serves v{o.to_version} ({o.new_version})" if o.installed else o.plan
    return pb.UpdateProgress(
        stage="done",
        detail=detail,
        elapsed_ms=elapsed_ms,
        outcome=pb.UpdateOutcome(
            model=o.model,
            from_version=o.from_version,
            to_version=o.to_version,
            new_version=o.new_version,
            plan=o.plan,
            fetched_bytes=o.fetched_bytes,
            full_bytes=o.full_bytes,
            installed=o.installed,
        ),
    )


def log_line(line: tuple[str, int]) -> pb.LogLine:
    text, dropped = line
    return pb.LogLine(text=text, dropped=dropped)


def stored_version(v: StoredVersion) -> pb.StoredVersion:
    return pb.StoredVersion(
        model=v.info.name,
        sha256=v.info.sha256,
        size=v.info.size,
        active=v.info.active,
        previous=v.info.previous,
        serving=v.serving,
        not_fitting=v.not_fitting,
    )


def versions_reply(listing: StoreListing) -> pb.ListVersionsReply:
    return pb.ListVersionsReply(
        versions=[stored_version(v) for v in listing.versions], store=str(listing.root)
    )


def cloud_status(c: CloudReport) -> pb.CloudStatus:
    return pb.CloudStatus(
        configured=c.configured,
        base_url=c.base_url,
        model=c.model,
        routing=c.routing,
        breaker=c.breaker,
        spent_day=c.spent_day,
        spent_month=c.spent_month,
        daily_cap=c.daily_cap,
        monthly_cap=c.monthly_cap,
        calls=c.calls,
        tasks=c.tasks,
        thresholds_file=c.thresholds_file,
        fitted_thresholds=c.fitted,
        shadow=_shadow(c.shadow) if c.shadow is not None else None,
    )


def _shadow(s: ShadowReport) -> pb.ShadowStatus:
    return pb.ShadowStatus(
        rate=s.rate,
        daily_cap=s.daily_cap,
        spent_day=s.spent_day,
        spent_month=s.spent_month,
        counts=s.counts,
        agreement=[
            pb.ShadowAgreement(
                key=a.key, model=a.model, agreed=a.agreed, total=a.total, low=a.low, high=a.high
            )
            for a in s.agreement
        ],
        directory=s.directory,
        recalibrated=s.recalibrated,
    )
