"""The gRPC front end on its sockets: the Inference and Admin services, health, reflection.

Typed against the seams only: it is handed an `Engine` and an `Admin` and translates. The
socket answers before any model loads (health says the process is alive while
`sidecar.v1.Inference` is NOT_SERVING); the composition root publishes readiness as the
models come up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar.calls.accounting import RequestLog
from sidecar.config import ServerConfig
from sidecar.domain.seam import Admin, Engine
from sidecar.server.interceptor import RequestInterceptor
from sidecar.server.peercred import PeerCredRelay
from sidecar.server.servicer import AdminServicer, InferenceServicer
from sidecar.socket_claim import SocketClaim
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("sidecar.daemon")

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name


def model_health_name(model: str) -> str:
    return f"{INFERENCE_SERVICE}/{model}"


def private_socket(public: Path) -> Path:
    """Where gRPC itself listens when the peer-credential relay owns the public socket."""
    return public.with_name(f".{public.name}.grpc")


def bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class GrpcListener:
    def __init__(
        self, settings: ServerConfig, engine: Engine, admin: Admin, requests: RequestLog
    ) -> None:
        s = self.settings = settings
        self.claim = SocketClaim(s.socket, dir_mode=0o750 if s.socket_group_access else 0o700)
        interceptor = RequestInterceptor(requests, s.tcp_token if s.tcp_port else "")
        self.server = grpc.aio.server(
            interceptors=[interceptor],
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health.aio.HealthServicer()
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(engine), self.server)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(admin), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
        )
        self.relay = (
            PeerCredRelay(s.socket, private_socket(s.socket)) if s.peer_credentials else None
        )
        self.tcp_port: int | None = None

    async def start(self, models: Iterable[str]) -> None:
        """Claim the socket and listen; every model NOT_SERVING until published ready.
        Raises SocketBusy when another daemon holds the socket."""
        s = self.settings
        self.claim.acquire()
        old_umask = os.umask(0o177)  # sockets are born 0600: no window where others can connect
        try:
            if self.relay is not None:
                self.relay.private.unlink(missing_ok=True)
                self.server.add_insecure_port(f"unix:{self.relay.private}")
            else:
                self.server.add_insecure_port(f"unix:{s.socket}")
            if s.tcp_port:
                self.tcp_port = self.server.add_insecure_port(
                    f"{bracketed(s.tcp_host)}:{s.tcp_port}"
                )
            await self.server.start()
            if self.relay is not None:
                await self.relay.start()
        except BaseException:
            await self.server.stop(0)
            self.claim.release()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(s.socket, s.socket_mode)
        # One line per listener: under journald this is how an operator finds the daemon.
        where = [f"unix:{s.socket}"]
        if self.tcp_port:
            where.append(f"{bracketed(s.tcp_host)}:{self.tcp_port}")
        log.info("gRPC API on %s", ", ".join(where))
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.publish(dict.fromkeys(models, False))

    async def publish(self, ready: dict[str, bool]) -> None:
        """Readiness per model and for the Inference service as a whole."""

        def status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
            r = health_pb2.HealthCheckResponse
            return r.SERVING if ok else r.NOT_SERVING

        await self.health.set(INFERENCE_SERVICE, status(bool(ready) and all(ready.values())))
        for name, ok in ready.items():
            await self.health.set(model_health_name(name), status(ok))

    def stop_accepting(self) -> None:
        if self.relay is not None:
            self.relay.stop_accepting()  # new connections are refused; open ones drain

    async def stop(self, grace: float) -> None:
        """In-flight calls get `grace` seconds; then the sockets go."""
        await self.server.stop(grace)
        if self.relay is not None:
            await self.relay.close()
        self.claim.release()
