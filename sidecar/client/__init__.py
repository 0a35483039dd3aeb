"""Python clients for the daemon: `Client` (blocking) and `AsyncClient` (asyncio).

    from sidecar.client import Client, ResourceExhaustedError
    with Client(retries=3) as c:             # found as the CLI finds it; or Client("/path/to.sock")
        reply = c.classify("I think someone stole my card",
                           ["lost_or_stolen_card", "card_arrival", "top_up_failed"])
        print(reply.label, reply.confidence.top_probability)

With no socket, a client looks where the `sidecar` CLI looks (`find_daemon`):
SIDECAR_SERVER_SOCKET, else server.socket in the config file (`config=PATH`, else
SIDECAR_CONFIG, else the user config, else /etc/sidecar/config.toml), else the default
socket path. Over `tcp=` with no `token`, server.tcp_token comes from the same places
(`token=""` sends none). A config file that cannot be read raises
`sidecar.domain.errors.ConfigError` naming the key.

Both clients have the same methods with the same arguments (`AsyncClient`'s are awaitable;
its streams are async iterators): inference (generate, chat and their `_stream`s,
classify, extract, embed, health) and admin (status, list_models, swap and swap_stream,
list_versions, add_model, remove_version, collect_garbage, check_update, apply_update and
apply_update_stream, load, unload, logs). Replies are the typed protobuf messages of `sidecar.v1`.

A refused call raises a `SidecarError` subclass (see `sidecar.client.errors` for the tree)
with `status_code`, `reason`, `message` and `request_id`; every one is also a
`grpc.RpcError`. `retries=N` retries UNAVAILABLE and RESOURCE_EXHAUSTED with exponential
backoff and jitter (`sidecar.client.retry`); the default, 0, raises at once.

The modules: connection (finding the daemon, metadata, channel options), requests (the
request messages), errors, retry, sync (`Client`), aio (`AsyncClient`). docs/client.md is
the guide.
"""

from __future__ import annotations

from sidecar.client.aio import AsyncClient, AsyncStream
from sidecar.client.connection import MAX_MESSAGE, Daemon, find_daemon
from sidecar.client.errors import (
    AuthenticationError,
    CallCancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SidecarError,
    UnavailableError,
)
from sidecar.client.requests import (
    Message,
    Routing,
    Strategy,
    chat_request,
    classify_request,
    embed_request,
    extract_request,
    generate_request,
)
from sidecar.client.sync import Client, Stream

__all__ = [
    "MAX_MESSAGE",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "CallCancelledError",
    "Client",
    "Daemon",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalServerError",
    "InvalidRequestError",
    "Message",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "Routing",
    "SidecarError",
    "Strategy",
    "Stream",
    "UnavailableError",
    "chat_request",
    "classify_request",
    "embed_request",
    "extract_request",
    "find_daemon",
    "generate_request",
]
