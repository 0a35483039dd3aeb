"""The asyncio client: `Client`'s methods, awaitable (streams are async iterators)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.client import requests as rq
from sidecar.client.connection import Connection
from sidecar.client.errors import ENDED, InternalServerError, from_rpc
from sidecar.client.requests import Message, Routing, Strategy
from sidecar.client.retry import Retry
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc as pb_grpc

T = TypeVar("T")


class AsyncStream(Generic[T]):
    """A server-streaming call: `async for` it, or `await read()` until `grpc.aio.EOF`;
    `cancel()` ends it early.

    A failure raises a `SidecarError`. With retries, a call refused before its first message
    (UNAVAILABLE, RESOURCE_EXHAUSTED) is made again; once a message has arrived it never is.
    Anything else (`code()`, `details()`, `trailing_metadata()`...) is the current gRPC call's.
    """

    def __init__(self, start: Callable[[], Any], retry: Retry) -> None:
        self._start = start
        self._retry = retry
        self._call = start()
        self._attempt = 0
        self._yielded = False

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        item = await self.read()
        if item is grpc.aio.EOF:
            raise StopAsyncIteration
        return item

    async def read(self) -> Any:
        """The next message, or `grpc.aio.EOF` after the last."""
        while True:
            try:
                item = await self._call.read()
            except grpc.RpcError as e:
                delay = None if self._yielded else self._retry.delay(self._attempt, e.code())
                if delay is None:
                    raise from_rpc(e) from None
                await asyncio.sleep(delay)
                self._attempt += 1
                self._call = self._start()
                continue
            self._yielded = True
            return item

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class AsyncClient(Connection):
    """asyncio client, with the same methods and arguments as `Client`. Create it inside
    the running loop; `async with` closes it."""

    def __init__(self, socket: str | Path | None = None, *, tcp: str | None = None,
                 token: str | None = None, timeout: float | None = None,
                 caller: str | None = None, config: Path | None = None, retries: int = 0,
                 backoff_s: float = 0.5, backoff_max_s: float = 8.0) -> None:  # fmt: skip
        super().__init__(socket, tcp, token, timeout, caller, config, retries, backoff_s,
                         backoff_max_s)  # fmt: skip
        self.channel = grpc.aio.insecure_channel(self.target, options=self._options)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        await self.channel.close()

    # ---------------------------------------------------------------- calls

    async def _unary(self, rpc: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        attempt = 0
        while True:
            try:
                return await rpc(request, **self._kw(timeout))
            except grpc.RpcError as e:
                delay = self.retry.delay(attempt, e.code())
                if delay is None:
                    raise from_rpc(e) from None
            await asyncio.sleep(delay)
            attempt += 1

    def _stream(self, rpc: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        return AsyncStream(lambda: rpc(request, **self._kw(timeout)), self.retry)

    @staticmethod
    async def _last(steps: AsyncIterator[T], on_progress: Callable[[T], object] | None) -> T:
        last = None
        async for step in steps:
            if on_progress is not None:
                on_progress(step)
            last = step
        if last is None:
            raise InternalServerError(grpc.StatusCode.UNKNOWN, ENDED)
        return last

    # ---------------------------------------------------------------- inference

    async def generate(self, prompt: str, *, model: str = "", max_tokens: int | None = None,
                 temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0, seed: int = 0,
                 stop: Sequence[str] = (), routing: Routing = "", sensitive: bool = False,
                 logprobs: bool = False, top_logprobs: int = 0, low_priority: bool = False,
                 adapter: str = "", timeout: float | None = None) -> pb.GenerateReply:  # fmt: skip
        """Continue a raw `prompt`. `max_tokens` None: the daemon's default; temperature 0:
        greedy (deterministic); `stop`: sequences that end it (left out of the text);
        `routing` "AUTO"/"LOCAL_ONLY"/"CLOUD_ONLY" ("" = the daemon's default);
        `sensitive`: never leaves the machine; `logprobs`/`top_logprobs` (0-20): each
        token's log-probability and alternatives in `reply.logprobs`; `low_priority`: bulk
        work, waits for and yields to normal requests (not for the streaming calls); `adapter`: a
        LoRA adapter of the model by name (`reply.adapter` names the version that answered)."""
        request = rq.generate_request(prompt, model=model, max_tokens=max_tokens,
                                      temperature=temperature, top_p=top_p, top_k=top_k,
                                      seed=seed, stop=stop, routing=routing, sensitive=sensitive,
                                      logprobs=logprobs, top_logprobs=top_logprobs,
                                      low_priority=low_priority, adapter=adapter)  # fmt: skip
        return await self._unary(self.inference.Generate, request, timeout)

    def generate_stream(self, prompt: str, *, model: str = "", max_tokens: int | None = None,
                        temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0,
                        seed: int = 0, stop: Sequence[str] = (), routing: Routing = "",
                        sensitive: bool = False, logprobs: bool = False, top_logprobs: int = 0,
                        adapter: str = "", timeout: float | None = None) -> AsyncStream[pb.GenerateChunk]:  # fmt: skip
        """`generate`, streamed: one chunk per piece of new text; the last chunk's `summary`
        is the whole reply (usage, timings, confidence)."""
        request = rq.generate_request(prompt, model=model, max_tokens=max_tokens,
                                      temperature=temperature, top_p=top_p, top_k=top_k,
                                      seed=seed, stop=stop, routing=routing, sensitive=sensitive,
                                      logprobs=logprobs, top_logprobs=top_logprobs, adapter=adapter)  # fmt: skip
        return self._stream(self.inference.GenerateStream, request, timeout)

    async def chat(self, messages: Iterable[Message], *, model: str = "", max_tokens: int | None = None,
             temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0, seed: int = 0,
             stop: Sequence[str] = (), routing: Routing = "", sensitive: bool = False,
             logprobs: bool = False, top_logprobs: int = 0, low_priority: bool = False,
             adapter: str = "", timeout: float | None = None) -> pb.GenerateReply:  # fmt: skip
        """One chat turn with the model's chat template. `messages`: ("role", "content")
        pairs or {"role", "content"} mappings; the rest as in `generate`."""
        request = rq.chat_request(messages, model=model, max_tokens=max_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                  stop=stop, routing=routing, sensitive=sensitive,
                                  logprobs=logprobs, top_logprobs=top_logprobs,
                                  low_priority=low_priority, adapter=adapter)  # fmt: skip
        return await self._unary(self.inference.Chat, request, timeout)

    def chat_stream(self, messages: Iterable[Message], *, model: str = "",
                    max_tokens: int | None = None, temperature: float = 0.0, top_p: float = 0.0,
                    top_k: int = 0, seed: int = 0, stop: Sequence[str] = (),
                    routing: Routing = "", sensitive: bool = False, logprobs: bool = False,
                    top_logprobs: int = 0,
                    adapter: str = "", timeout: float | None = None) -> AsyncStream[pb.GenerateChunk]:  # fmt: skip
        """`chat`, streamed as `generate_stream` is."""
        request = rq.chat_request(messages, model=model, max_tokens=max_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                  stop=stop, routing=routing, sensitive=sensitive,
                                  logprobs=logprobs, top_logprobs=top_logprobs, adapter=adapter)  # fmt: skip
        return self._stream(self.inference.ChatStream, request, timeout)

    async def classify(self, text: str, labels: Sequence[str] = (), *, instruction: str = "",
                 model: str = "", examples: Iterable[tuple[str, str]] = (), task: str = "",
                 routing: Routing = "", sensitive: bool = False, allow_none: bool = False,
                 low_priority: bool = False,
                 adapter: str = "", timeout: float | None = None) -> pb.ClassifyReply:  # fmt: skip
        """Exactly one of `labels` for `text`: by label scoring, or by labelled `examples`
        ((text, label) pairs), or by a configured `task`; with those, `labels` narrows the
        answer. `reply.label`, `reply.scores` (best first), `reply.confidence`;
        `reply.novelty` (set when measured) and `reply.out_of_scope`. With `allow_none`, a
        text like none of the labels gets `reply.label == ""`. `low_priority`: wait until no
        normal request waits (bulk work beside live callers)."""
        request = rq.classify_request(text, labels, instruction=instruction, model=model,
                                      examples=examples, task=task, routing=routing,
                                      sensitive=sensitive, allow_none=allow_none,
                                      low_priority=low_priority, adapter=adapter)  # fmt: skip
        return await self._unary(self.inference.Classify, request, timeout)

    async def extract(self, text: str, schema: str | Mapping[str, Any], *, instruction: str = "",
                model: str = "", max_tokens: int | None = None, routing: Routing = "",
                sensitive: bool = False, low_priority: bool = False,
                adapter: str = "", timeout: float | None = None) -> pb.ExtractReply:  # fmt: skip
        """JSON from `text` that validates against `schema` (a JSON Schema, as a mapping or
        JSON text): `reply.json`; `low_priority` as in `classify`."""
        request = rq.extract_request(text, schema, instruction=instruction, model=model,
                                     max_tokens=max_tokens, routing=routing,
                                     sensitive=sensitive, low_priority=low_priority, adapter=adapter)  # fmt: skip
        return await self._unary(self.inference.Extract, request, timeout)

    async def embed(self, texts: Sequence[str], *, normalize: bool = False, model: str = "",
              timeout: float | None = None) -> pb.EmbedReply:  # fmt: skip
        """One vector per text (`reply.embeddings[i].values`); `normalize`: unit length."""
        request = rq.embed_request(texts, normalize=normalize, model=model)
        return await self._unary(self.inference.Embed, request, timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """ "SERVING", "NOT_SERVING" or "SERVICE_UNKNOWN" for `service`: "" = the process is
        up, "sidecar.v1.Inference" = ready to serve."""
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await self._unary(self._health.Check, request, timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    # ---------------------------------------------------------------- admin

    async def status(self, *, timeout: float | None = None) -> pb.StatusReply:
        """What the daemon serves: models, versions, workers, queues, counters, cloud."""
        return await self._unary(self.admin.Status, pb.StatusRequest(), timeout)

    async def list_models(self, *, timeout: float | None = None) -> pb.ListModelsReply:
        """The configured models and their state (as in `status`)."""
        return await self._unary(self.admin.ListModels, pb.ListModelsRequest(), timeout)

    def swap_stream(self, model: str = "", *, version: str = "", path: str | Path = "",
                    strategy: Strategy = "",
                    timeout: float | None = None) -> AsyncStream[pb.SwapProgress]:  # fmt: skip
        """`swap`'s progress, one message per stage; the last has `finished` set."""
        request = rq.swap_request(model, version=version, path=path, strategy=strategy)
        return self._stream(self.admin.Swap, request, timeout)

    async def swap(self, model: str = "", *, version: str = "", path: str | Path = "",
             strategy: Strategy = "", on_progress: Callable[[pb.SwapProgress], object] | None = None,
             timeout: float | None = None) -> pb.SwapProgress:  # fmt: skip
        """Hot-swap `model` ("" = the default) to a stored `version` (sha256 or a unique
        prefix) or to the GGUF file at `path`; returns the last progress message (`ok`,
        `old`, `new`), calling `on_progress` with each one before it. A refused swap raises
        `FailedPreconditionError` and the old model keeps serving. Once started, a swap runs
        to its end on the daemon even if this call stops waiting."""
        steps = self.swap_stream(model, version=version, path=path, strategy=strategy,
                                 timeout=timeout)  # fmt: skip
        return await self._last(steps, on_progress)

    async def list_versions(self, *, timeout: float | None = None) -> pb.ListVersionsReply:
        """Every stored version of every model (`active`, `previous`, `serving`)."""
        return await self._unary(self.admin.ListVersions, pb.ListVersionsRequest(), timeout)

    async def add_model(self, path: str | Path, *, name: str, adapter_for: str = "",
                  timeout: float | None = None) -> pb.AddModelReply:  # fmt: skip
        """Verify the GGUF file at `path` (on the daemon's machine) and store it under
        `name`; it does not start serving (`swap` does). `reply.version` is what was stored.
        `adapter_for`: the file is a LoRA adapter named `name` of that model: checked
        against it, proven on a worker, then active (requests name it as `adapter`)."""
        request = rq.add_model_request(path, name=name, adapter_for=adapter_for)
        return await self._unary(self.admin.AddModel, request, timeout)

    async def remove_version(
        self, model: str, version: str, *, timeout: float | None = None
    ) -> None:
        """Remove a stored version (never the active one, or one a worker maps)."""
        request = pb.RemoveVersionRequest(model=model, version=version)
        await self._unary(self.admin.RemoveVersion, request, timeout)

    async def collect_garbage(self, *, empty_quarantine: bool = False,
                        timeout: float | None = None) -> pb.CollectGarbageReply:  # fmt: skip
        """Remove the versions nothing needs (`reply.removed`); `empty_quarantine`: also
        every quarantined file."""
        request = pb.CollectGarbageRequest(empty_quarantine=empty_quarantine)
        return await self._unary(self.admin.CollectGarbage, request, timeout)

    async def check_update(
        self, model: str = "", *, ignore_rollout: bool = False, timeout: float | None = None
    ) -> pb.UpdateCheck:
        """Whether `model` ("" = the default) has an update at its origin, and the plan;
        `ignore_rollout`: even outside its staged rollout's cohort (as `apply_update`)."""
        request = pb.UpdateRequest(model=model, ignore_rollout=ignore_rollout)
        return await self._unary(self.admin.CheckUpdate, request, timeout)

    def apply_update_stream(self, model: str = "", *, ignore_rollout: bool = False,
                            timeout: float | None = None) -> AsyncStream[pb.UpdateProgress]:  # fmt: skip
        """`apply_update`'s progress; the last message has `outcome` set."""
        request = pb.UpdateRequest(model=model, ignore_rollout=ignore_rollout)
        return self._stream(self.admin.ApplyUpdate, request, timeout)

    async def apply_update(self, model: str = "", *,
                     on_progress: Callable[[pb.UpdateProgress], object] | None = None,
                     ignore_rollout: bool = False,
                     timeout: float | None = None) -> pb.UpdateOutcome:  # fmt: skip
        """Fetch, rebuild, verify, install and swap to `model`'s update; returns the outcome
        (`installed` False: already up to date, or outside the version's staged rollout:
        `ignore_rollout` takes it anyway, a manual canary), calling `on_progress` with each
        progress message. A refused update raises and the current model keeps serving."""
        steps = self.apply_update_stream(model, ignore_rollout=ignore_rollout, timeout=timeout)
        last = await self._last(steps, on_progress)
        return last.outcome

    def logs(self, lines: int = 0, *, follow: bool = False,
             timeout: float | None = None) -> AsyncStream[pb.LogLine]:  # fmt: skip
        """The daemon's last `lines` log lines (0: all it keeps, about a thousand), as it
        formats them; `follow`: then each new line as it is logged, until `cancel()`."""
        request = pb.LogsRequest(lines=lines, follow=follow)
        if follow and timeout is None:  # a follower has no deadline: it ends on cancel()
            return AsyncStream(lambda: self.admin.Logs(request, metadata=self._md), self.retry)
        return self._stream(self.admin.Logs, request, timeout)

    async def load(self, model: str = "", *, timeout: float | None = None) -> pb.ResidencyReply:
        """Load `model` ("" = the default) now, making room in server.max_model_memory_mb
        first; `reply.changed` False: it was loaded already."""
        return await self._unary(self.admin.Load, pb.ResidencyRequest(model=model), timeout)

    async def unload(self, model: str = "", *, timeout: float | None = None) -> pb.ResidencyReply:
        """Stop `model`'s workers and return their memory (refused with
        `FailedPreconditionError` while requests are in flight); the next request loads it."""
        return await self._unary(self.admin.Unload, pb.ResidencyRequest(model=model), timeout)
