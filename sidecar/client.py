"""Python clients for the daemon: `Client` (blocking) and `AsyncClient` (asyncio).

    from sidecar.client import Client
    with Client() as c:                      # found as the CLI finds it; or Client("/path/to.sock")
        reply = c.classify("I think someone stole my card",
                           ["lost_or_stolen_card", "card_arrival", "top_up_failed"])
        print(reply.label, reply.confidence.top_probability)

With no socket, a client looks where the `sidecar` CLI looks (`find_daemon`):
SIDECAR_SERVER_SOCKET, else server.socket in the config file (`config=PATH`, else
SIDECAR_CONFIG, else the user config, else /etc/sidecar/config.toml), else the default
socket path. Over `tcp=` with no `token`, server.tcp_token comes from the same places
(`token=""` sends none).

Replies are the typed protobuf messages of `sidecar.v1`. Failures raise
`grpc.RpcError` with the daemon's status code and message; a config file that cannot be
read raises `sidecar.domain.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.calls.callers import CALLER_HEADER as CALLER_METADATA
from sidecar.config import Overrides, load_client
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc as pb_grpc

Message = tuple[str, str] | Mapping[str, str]
MAX_MESSAGE = 64 * 1024 * 1024


@dataclass(frozen=True)
class Daemon:
    """Where a daemon answers: a gRPC target, the socket behind it, the token to send."""

    target: str  # "unix:/path" or "host:port"
    socket: Path | None  # None over TCP
    token: str | None


def find_daemon(
    socket: str | Path | None = None,
    *,
    tcp: str | None = None,
    token: str | None = None,
    config: Path | None = None,
) -> Daemon:
    """The one way `Client`, `AsyncClient` and the CLI find the daemon: what the caller
    gave, else the client view of the config (`sidecar.config.load_client`: env > config
    file > default). The file is read only for what was not given."""
    if tcp:
        if token is None:  # a TCP listener wants server.tcp_token; a Unix socket wants none
            token = load_client(Overrides(config=config)).tcp_token or None
        return Daemon(tcp, None, token)
    path = Path(socket) if socket else load_client(Overrides(config=config)).socket
    return Daemon(f"unix:{path}", path, token)


def _metadata(token: str | None, caller: str | None) -> tuple[tuple[str, str], ...]:
    md: list[tuple[str, str]] = []
    if token:
        md.append(("authorization", f"Bearer {token}"))
    if caller:
        md.append((CALLER_METADATA, caller))
    return tuple(md)


def _sampling(
    temperature: float, top_p: float, top_k: int, seed: int, stop: Sequence[str]
) -> pb.Sampling:
    return pb.Sampling(
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=list(stop)
    )


def _routing(routing: str) -> pb.Routing.ValueType:
    """ "AUTO", "LOCAL_ONLY", "CLOUD_ONLY" or "" (the daemon's default)."""
    return pb.Routing.Value(f"ROUTING_{routing.upper()}") if routing else pb.ROUTING_UNSPECIFIED


def generate_request(prompt: str, *, model: str = "", max_tokens: int | None = None, temperature: float = 0.0,
                     top_p: float = 0.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] = (),
                     routing: str = "", sensitive: bool = False, logprobs: bool = False,
                     top_logprobs: int = 0) -> pb.GenerateRequest:  # fmt: skip
    return pb.GenerateRequest(
        model=model, prompt=prompt, max_tokens=max_tokens,
        sampling=_sampling(temperature, top_p, top_k, seed, stop),
        routing=_routing(routing), sensitive=sensitive,
        logprobs=logprobs, top_logprobs=top_logprobs,
    )  # fmt: skip


def chat_request(messages: Iterable[Message], *, model: str = "", max_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 0.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] = (),
                 routing: str = "", sensitive: bool = False, logprobs: bool = False,
                 top_logprobs: int = 0) -> pb.ChatRequest:  # fmt: skip
    msgs = [
        pb.ChatMessage(role=m[0], content=m[1]) if isinstance(m, tuple)
        else pb.ChatMessage(role=m["role"], content=m["content"])
        for m in messages
    ]  # fmt: skip
    return pb.ChatRequest(
        model=model, messages=msgs, max_tokens=max_tokens,
        sampling=_sampling(temperature, top_p, top_k, seed, stop),
        routing=_routing(routing), sensitive=sensitive,
        logprobs=logprobs, top_logprobs=top_logprobs,
    )  # fmt: skip


def classify_request(
    text: str, labels: Sequence[str] = (), *, instruction: str = "", model: str = "",
    examples: Iterable[tuple[str, str]] = (), task: str = "", routing: str = "",
    sensitive: bool = False,
) -> pb.ClassifyRequest:  # fmt: skip
    return pb.ClassifyRequest(
        model=model, text=text, labels=list(labels), instruction=instruction,
        examples=[pb.Example(text=t, label=y) for t, y in examples], task=task,
        routing=_routing(routing), sensitive=sensitive,
    )  # fmt: skip


def extract_request(text: str, schema: str | Mapping[str, Any], *, instruction: str = "", model: str = "",
                    max_tokens: int | None = None, routing: str = "",
                    sensitive: bool = False) -> pb.ExtractRequest:  # fmt: skip
    schema_text = schema if isinstance(schema, str) else json.dumps(schema)
    return pb.ExtractRequest(
        model=model,
        text=text,
        json_schema=schema_text,
        instruction=instruction,
        max_tokens=max_tokens,
        routing=_routing(routing),
        sensitive=sensitive,
    )


def embed_request(
    texts: Sequence[str], *, normalize: bool = False, model: str = ""
) -> pb.EmbedRequest:
    return pb.EmbedRequest(model=model, texts=list(texts), normalize=normalize)


class _Base:
    def __init__(self, socket: str | Path | None = None, *, tcp: str | None = None, token: str | None = None,
                 timeout: float | None = None, caller: str | None = None,
                 config: Path | None = None) -> None:  # fmt: skip
        daemon = find_daemon(socket, tcp=tcp, token=token, config=config)
        self.target = daemon.target
        self.socket = daemon.socket
        self.timeout = timeout
        self._md = _metadata(daemon.token, caller)
        self._options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": timeout if timeout is not None else self.timeout, "metadata": self._md}


class Client(_Base):
    """Blocking client. One channel (one connection) per client; thread-safe."""

    def __init__(self, socket: str | Path | None = None, **kw: Any) -> None:
        super().__init__(socket, **kw)
        self.channel = grpc.insecure_channel(self.target, options=self._options)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, prompt: str, *, timeout: float | None = None, **kw: Any) -> pb.GenerateReply:
        return self.inference.Generate(generate_request(prompt, **kw), **self._kw(timeout))

    def generate_stream(
        self, prompt: str, *, timeout: float | None = None, **kw: Any
    ) -> Iterator[pb.GenerateChunk]:
        return self.inference.GenerateStream(generate_request(prompt, **kw), **self._kw(timeout))

    def chat(
        self, messages: Iterable[Message], *, timeout: float | None = None, **kw: Any
    ) -> pb.GenerateReply:
        return self.inference.Chat(chat_request(messages, **kw), **self._kw(timeout))

    def chat_stream(
        self, messages: Iterable[Message], *, timeout: float | None = None, **kw: Any
    ) -> Iterator[pb.GenerateChunk]:
        return self.inference.ChatStream(chat_request(messages, **kw), **self._kw(timeout))

    def classify(
        self, text: str, labels: Sequence[str] = (), *, timeout: float | None = None, **kw: Any
    ) -> pb.ClassifyReply:
        return self.inference.Classify(classify_request(text, labels, **kw), **self._kw(timeout))

    def extract(
        self, text: str, schema: str | Mapping[str, Any], *, timeout: float | None = None, **kw: Any
    ) -> pb.ExtractReply:
        return self.inference.Extract(extract_request(text, schema, **kw), **self._kw(timeout))

    def embed(
        self, texts: Sequence[str], *, timeout: float | None = None, **kw: Any
    ) -> pb.EmbedReply:
        return self.inference.Embed(embed_request(texts, **kw), **self._kw(timeout))

    def status(self, *, timeout: float | None = None) -> pb.StatusReply:
        return self.admin.Status(pb.StatusRequest(), **self._kw(timeout))

    def list_models(self, *, timeout: float | None = None) -> pb.ListModelsReply:
        return self.admin.ListModels(pb.ListModelsRequest(), **self._kw(timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """SERVING / NOT_SERVING / SERVICE_UNKNOWN for `service` ("" = the process)."""
        reply = self._health.Check(
            health_pb2.HealthCheckRequest(service=service), **self._kw(timeout)
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class AsyncClient(_Base):
    """asyncio client. Create it inside the running loop."""

    def __init__(self, socket: str | Path | None = None, **kw: Any) -> None:
        super().__init__(socket, **kw)
        self.channel = grpc.aio.insecure_channel(self.target, options=self._options)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(
        self, prompt: str, *, timeout: float | None = None, **kw: Any
    ) -> pb.GenerateReply:
        return await self.inference.Generate(generate_request(prompt, **kw), **self._kw(timeout))

    def generate_stream(
        self, prompt: str, *, timeout: float | None = None, **kw: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        return self.inference.GenerateStream(generate_request(prompt, **kw), **self._kw(timeout))

    async def chat(
        self, messages: Iterable[Message], *, timeout: float | None = None, **kw: Any
    ) -> pb.GenerateReply:
        return await self.inference.Chat(chat_request(messages, **kw), **self._kw(timeout))

    def chat_stream(
        self, messages: Iterable[Message], *, timeout: float | None = None, **kw: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        return self.inference.ChatStream(chat_request(messages, **kw), **self._kw(timeout))

    async def classify(
        self, text: str, labels: Sequence[str] = (), *, timeout: float | None = None, **kw: Any
    ) -> pb.ClassifyReply:
        return await self.inference.Classify(
            classify_request(text, labels, **kw), **self._kw(timeout)
        )

    async def extract(
        self, text: str, schema: str | Mapping[str, Any], *, timeout: float | None = None, **kw: Any
    ) -> pb.ExtractReply:
        return await self.inference.Extract(
            extract_request(text, schema, **kw), **self._kw(timeout)
        )

    async def embed(
        self, texts: Sequence[str], *, timeout: float | None = None, **kw: Any
    ) -> pb.EmbedReply:
        return await self.inference.Embed(embed_request(texts, **kw), **self._kw(timeout))

    async def status(self, *, timeout: float | None = None) -> pb.StatusReply:
        return await self.admin.Status(pb.StatusRequest(), **self._kw(timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        reply = await self._health.Check(
            health_pb2.HealthCheckRequest(service=service), **self._kw(timeout)
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
