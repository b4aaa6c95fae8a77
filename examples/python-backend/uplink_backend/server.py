"""The services on one TLS port: AgentService (both rungs: gRPC over
HTTP/2, Connect unary over HTTP/1.1 and h2) and the part of AdminService
that `uplink ctl agents`, `ctl ping` and `uplink conformance` use, from one
handler per method (connectrpc on hypercorn)."""

import argparse
import asyncio
import logging
import os
import secrets
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# The generated code: gen.sh's output, gen/ beside this package unless
# UPLINK_BACKEND_GEN names another directory.
sys.path.insert(0, os.environ.get("UPLINK_BACKEND_GEN") or os.path.join(os.path.dirname(HERE), "gen"))

from connectrpc.code import Code  # noqa: E402
from connectrpc.compression.gzip import GzipCompression  # noqa: E402
from connectrpc.compression.zstd import ZstdCompression  # noqa: E402
from connectrpc.errors import ConnectError  # noqa: E402
from protobuf import Oneof  # noqa: E402

import uplink.v1.admin_pb as M  # noqa: E402
import uplink.v1.agent_pb as A  # noqa: E402
import uplink.v1.metrics_pb as B  # noqa: E402
from uplink.v1.admin_connect import AdminService, AdminServiceASGIApplication  # noqa: E402
from uplink.v1.agent_connect import AgentService, AgentServiceASGIApplication  # noqa: E402

from . import batch as batches  # noqa: E402
from .state import MAX_POLL_COMMANDS, Refused, State, check_info, now_ms  # noqa: E402

log = logging.getLogger("uplink-backend")

# The largest request body taken (the reference backend's default).
MAX_MESSAGE = 4 << 20
# A body over the limit is read to its end up to this size before the
# error is answered (see too_large).
DRAIN_MAX = 16 << 20


def refused(e):
    return ConnectError(Code[e.code.upper()], str(e))


def frame(kind, value):
    return A.ServerFrame(kind=Oneof(kind, value))


def command_frame(cmd):
    return frame("command", to_command(cmd))


def to_command(cmd):
    return A.Command(id=cmd.id, seq=cmd.seq, created_unix_ms=cmd.created_ms, spec=cmd.spec)


class Agents(AgentService):
    def __init__(self, state, heartbeat_ms, hold_ms):
        self.state, self.heartbeat_ms, self.hold_ms = state, heartbeat_ms, hold_ms

    def heartbeat(self):
        return frame("heartbeat", A.Heartbeat(server_time_unix_ms=now_ms(), interval_ms=self.heartbeat_ms))

    def caller(self, ctx, info=None):
        agent = self.state.authenticate(ctx.request_headers.get("authorization", ""))
        if info is not None:
            check_info(info, at_enroll=False)
        return agent

    async def enroll(self, request, ctx):
        try:
            agent, credential = self.state.enroll(request.enrollment_token, request.info, request.idempotency_key)
        except Refused as e:
            raise refused(e) from None
        log.info("enrolled %s (%s) in %s", agent.id, agent.hostname, agent.provider)
        return A.EnrollResponse(agent_id=agent.id, credential=credential, provider=agent.provider)

    async def subscribe(self, request, ctx):
        try:
            agent = self.caller(ctx, request.info)
            self.state.apply_ack(agent, request.ack)
        except Refused as e:
            raise refused(e) from None
        own = self.state.heard(agent, request.info, M.Transport.GRPC.value)
        # A heartbeat first, at once: an agent takes a stream without a
        # frame within 4 s for a path that blocks HTTP/2.
        yield A.SubscribeResponse(frame=self.heartbeat())
        sent = agent.acked
        if own:
            agent.streams += 1
        try:
            while True:
                wake = agent.wake
                if agent.revoked_ms:
                    raise ConnectError(Code.UNAUTHENTICATED, f"agent {agent.id} is revoked")
                for cmd in agent.above(max(sent, agent.acked)):
                    yield A.SubscribeResponse(frame=command_frame(cmd))
                    sent = cmd.seq
                try:
                    await asyncio.wait_for(wake.wait(), self.heartbeat_ms / 1000)
                except asyncio.TimeoutError:
                    yield A.SubscribeResponse(frame=self.heartbeat())
        finally:
            if own:
                agent.streams -= 1
                agent.last_seen_ms = now_ms()

    async def poll(self, request, ctx):
        try:
            agent = self.caller(ctx, request.info)
            self.state.apply_ack(agent, request.ack)
        except Refused as e:
            raise refused(e) from None
        own = self.state.heard(agent, request.info, M.Transport.LONGPOLL.value)
        hold = min(request.hold_ms or self.hold_ms, self.hold_ms) / 1000
        deadline = time.monotonic() + hold
        if own:
            agent.polls += 1
        try:
            while True:
                wake = agent.wake
                if agent.revoked_ms:
                    raise ConnectError(Code.UNAUTHENTICATED, f"agent {agent.id} is revoked")
                ready = agent.above(agent.acked, MAX_POLL_COMMANDS)
                if ready:
                    return A.PollResponse(frames=[command_frame(c) for c in ready])
                left = deadline - time.monotonic()
                if left <= 0:
                    return A.PollResponse(frames=[self.heartbeat()])
                try:
                    await asyncio.wait_for(wake.wait(), left)
                except asyncio.TimeoutError:
                    pass
        finally:
            if own:
                agent.polls -= 1
                agent.last_seen_ms = now_ms()

    async def report(self, request, ctx):
        try:
            agent = self.caller(ctx)
            self.state.apply_ack(agent, request.ack)
            acked = self.state.report(agent, request.epoch, list(request.events))
        except Refused as e:
            raise refused(e) from None
        agent.last_seen_ms = now_ms()
        return A.ReportResponse(acked_seq=acked)

    async def push_metrics(self, request, ctx):
        try:
            agent = self.caller(ctx)
            self.state.apply_ack(agent, request.ack)
        except Refused as e:
            raise refused(e) from None
        agent.last_seen_ms = now_ms()
        epoch, seq = request.epoch, request.seq
        try:
            samples = decode_request(request)
        except batches.BatchError as e:
            # It can never be stored: its seq is used up.
            if 1 <= seq < 1 << 63:
                self.state.record_batch(agent, epoch, seq)
            raise ConnectError(Code.INVALID_ARGUMENT, f"metric batch rejected ({e.reason}): {e}") from None
        if seq == 0 or seq >= 1 << 63:
            raise ConnectError(
                Code.INVALID_ARGUMENT,
                f"metric batch rejected (bad_seq): seq {seq} is out of range; batches are numbered 1, 2, 3, ... within their epoch",
            )
        state = self.state.batch_state(agent, epoch, seq)
        answer = dict(reads_series_deltas=True, reads_batch_zstd=True)
        if state == "seen":
            return A.PushMetricsResponse(stored=False, **answer)
        if state != "new":
            raise ConnectError(
                Code.FAILED_PRECONDITION,
                f"metric batch rejected (seq_too_far_ahead): seq {seq} of epoch {epoch} is more than 100000 above {state}; "
                f"send batch {state + 1} first and retry this one later",
            )
        self.state.store_samples(agent, samples)
        self.state.record_batch(agent, epoch, seq)
        return A.PushMetricsResponse(stored=True, **answer)

    async def rotate_credential(self, request, ctx):
        try:
            agent = self.caller(ctx)
        except Refused as e:
            raise refused(e) from None
        return A.RotateCredentialResponse(credential=self.state.rotate(agent))


def decode_request(request):
    """The samples of a PushMetricsRequest, from `batch` or `batch_zstd`."""
    if request.batch is not None and request.batch_zstd:
        raise batches.BatchError("both_batch_forms", "the request sets both batch and batch_zstd: set one of them")
    if request.batch_zstd:
        try:
            raw = ZstdCompression().decompress(request.batch_zstd, MAX_MESSAGE)
            batch = B.MetricBatch.from_binary(raw)
        except Exception as e:  # noqa: BLE001 (any damage: the batch is refused)
            raise batches.BatchError("batch_zstd", f"batch_zstd is not a zstd frame of a MetricBatch: {e}") from None
    else:
        batch = request.batch or B.MetricBatch()
    return batches.decode(batch)


class Admin(AdminService):
    def __init__(self, state, admin_token):
        self.state, self.token = state, admin_token

    def check(self, ctx):
        given = ctx.request_headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise ConnectError(Code.UNAUTHENTICATED, "send the admin token as authorization: Bearer <token>")

    async def list_agents(self, request, ctx):
        self.check(ctx)
        now = now_ms()
        views = []
        for a in self.state.agents.values():
            if request.provider and a.provider != request.provider:
                continue
            connected = a.connected(now)
            views.append(
                M.AgentView(
                    id=a.id,
                    hostname=a.hostname,
                    provider=a.provider,
                    connected=connected,
                    transport=M.Transport(a.transport) if connected else M.Transport.UNSPECIFIED,
                    transport_reason=a.transport_reason,
                    last_seen_unix_ms=a.last_seen_ms,
                    version=a.version,
                    acked_seq=a.acked,
                    pending_commands=len(a.above(a.acked, 1 << 30)),
                    enrolled_unix_ms=a.enrolled_ms,
                    capacity=a.capacity,
                    revoked_unix_ms=a.revoked_ms,
                )
            )
        return M.ListAgentsResponse(agents=views)

    async def revoke_agent(self, request, ctx):
        self.check(ctx)
        try:
            return M.RevokeAgentResponse(revoked_unix_ms=self.state.revoke(request.agent_id))
        except Refused as e:
            raise refused(e) from None

    async def enqueue_command(self, request, ctx):
        self.check(ctx)
        try:
            cmd = self.state.enqueue(request.agent_id, request.spec)
        except Refused as e:
            raise refused(e) from None
        return M.EnqueueCommandResponse(command=to_command(cmd))

    async def get_command(self, request, ctx):
        self.check(ctx)
        try:
            cmd = self.state.command(request.command_id)
        except Refused as e:
            raise refused(e) from None
        if request.wait_ms and not cmd.done_ms:
            try:
                await asyncio.wait_for(cmd.done.wait(), min(request.wait_ms, 60_000) / 1000)
            except asyncio.TimeoutError:
                pass
        state = M.CommandState.DONE if cmd.done_ms else M.CommandState.ACCEPTED if cmd.accepted_ms else M.CommandState.QUEUED
        return M.GetCommandResponse(
            command=M.CommandView(
                command=to_command(cmd),
                agent_id=cmd.agent_id,
                state=state,
                accepted_unix_ms=cmd.accepted_ms,
                done_unix_ms=cmd.done_ms,
                result=cmd.result,
            )
        )

    async def _not_here(self, ctx):
        self.check(ctx)
        raise ConnectError(Code.UNIMPLEMENTED, "this backend has no providers management or runs")

    async def list_providers(self, request, ctx):
        await self._not_here(ctx)

    async def create_provider(self, request, ctx):
        await self._not_here(ctx)

    async def rotate_enrollment_token(self, request, ctx):
        await self._not_here(ctx)

    async def create_run(self, request, ctx):
        await self._not_here(ctx)

    async def list_runs(self, request, ctx):
        await self._not_here(ctx)

    async def get_run(self, request, ctx):
        await self._not_here(ctx)

    async def stop_run(self, request, ctx):
        await self._not_here(ctx)

    async def get_run_logs(self, request, ctx):
        await self._not_here(ctx)


def escape(value):
    """A label value as the Prometheus text format quotes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_page(state):
    """`GET /metrics`: the latest value of every series, Prometheus text."""
    lines = [f"uplink_backend_metric_samples_total {state.samples}"]
    for (agent, series), (t, v) in sorted(state.latest.items(), key=lambda kv: (kv[0][1].name, kv[0][0])):
        own = [("exported_" + k if k == "agent" else k, v2) for k, v2 in series.labels]
        labels = [("agent", agent)] + [("".join(c if c.isalnum() or c == "_" else "_" for c in k), v2) for k, v2 in own]
        text = ",".join(f'{k}="{escape(val)}"' for k, val in labels)
        name = "".join(c if c.isalnum() or c in "_:" else "_" for c in series.name)
        lines.append(f"{name}{{{text}}} {batches.render(v)} {t}")
    return ("\n".join(lines) + "\n").encode()


async def too_large(scope, receive, send):
    """Answers a Connect call whose declared body is over the limit with
    `resource_exhausted`, after reading its body (up to DRAIN_MAX; beyond,
    the connection is closed): answered before the body is read, the
    client may lose the answer to a reset, and on HTTP/1.1 the
    connection's next request would be read from the middle of the body."""
    headers = dict(scope["headers"])
    if headers.get(b"content-type", b"").startswith(b"application/grpc"):
        return False  # gRPC frames carry their own lengths, checked by the runtime
    try:
        length = int(headers.get(b"content-length", b"0"))
    except ValueError:
        length = 0
    if length <= MAX_MESSAGE:
        return False
    read, more = 0, length <= DRAIN_MAX
    while more:
        message = await receive()
        read += len(message.get("body", b""))
        more = message.get("more_body", False) and message["type"] == "http.request"
    body = (
        '{"code":"resource_exhausted","message":"the request body of %d bytes is over the limit of %d bytes"}'
        % (length, MAX_MESSAGE)
    ).encode()
    response_headers = [(b"content-type", b"application/json")]
    if length > DRAIN_MAX:
        response_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 429, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})
    return True


def app_for(state, admin_token, heartbeat_ms, hold_ms):
    compressions = [GzipCompression(), ZstdCompression()]
    apps = [
        AgentServiceASGIApplication(Agents(state, heartbeat_ms, hold_ms), read_max_bytes=MAX_MESSAGE, compressions=compressions),
        AdminServiceASGIApplication(Admin(state, admin_token), read_max_bytes=MAX_MESSAGE, compressions=compressions),
    ]
    routes = {a.path: a for a in apps}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope.get("path", "")
        target = routes.get("/" + path.lstrip("/").split("/", 1)[0])
        if scope["type"] == "http" and target is not None:
            if await too_large(scope, receive, send):
                return
            return await target(scope, receive, send)
        if scope["type"] == "http" and path == "/metrics" and scope["method"] == "GET":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if secrets.compare_digest(auth, f"Bearer {admin_token}".encode()):
                body, status = metrics_page(state), 200
            else:
                body, status = b"send the admin token as authorization: Bearer <token>\n", 401
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain; version=0.0.4")]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"not found\n"})

    return app


def main(argv=None):
    p = argparse.ArgumentParser(prog="uplink_backend", description="A small uplink backend in Python.")
    p.add_argument("--listen", default=os.environ.get("UPLINK_LISTEN", "127.0.0.1:8443"), help="host:port (one TLS port for both rungs)")
    p.add_argument("--tls-cert", default=os.environ.get("UPLINK_TLS_CERT"), required=not os.environ.get("UPLINK_TLS_CERT"), help="PEM certificate chain")
    p.add_argument("--tls-key", default=os.environ.get("UPLINK_TLS_KEY"), required=not os.environ.get("UPLINK_TLS_KEY"), help="PEM private key")
    p.add_argument("--heartbeat-interval-ms", type=int, default=10_000)
    p.add_argument("--poll-hold-ms", type=int, default=25_000)
    a = p.parse_args(argv)
    admin_token = os.environ.get("UPLINK_ADMIN_TOKEN", "")
    enroll_token = os.environ.get("UPLINK_ENROLL_TOKEN", "")
    problems = []
    if len(admin_token) < 16:
        problems.append("UPLINK_ADMIN_TOKEN: set the admin token (16 characters or more) in the environment")
    if len(enroll_token) < 16:
        problems.append("UPLINK_ENROLL_TOKEN: set the enrollment token (16 characters or more) in the environment")
    if not 1_000 <= a.heartbeat_interval_ms <= 300_000:
        problems.append("--heartbeat-interval-ms: use 1000 to 300000")
    if not 1_000 <= a.poll_hold_ms <= 60_000:
        problems.append("--poll-hold-ms: use 1000 to 60000")
    for flag, path in (("--tls-cert", a.tls_cert), ("--tls-key", a.tls_key)):
        if not os.path.isfile(path):
            problems.append(f"{flag} {path}: no such file")
    if problems:
        for problem in problems:
            print(f"uplink_backend: {problem}", file=sys.stderr)
        return 64

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [a.listen]
    config.certfile, config.keyfile = a.tls_cert, a.tls_key
    config.alpn_protocols = ["h2", "http/1.1"]
    # Long polls and streams outlive hypercorn's defaults only while a
    # request is active; idle connections close after 60 s.
    config.keep_alive_timeout = 60
    config.accesslog = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    state = State(enroll_token)
    log.info("backend listening on https://%s (gRPC and Connect on one port)", a.listen)
    asyncio.run(serve(app_for(state, admin_token, a.heartbeat_interval_ms, a.poll_hold_ms), config))
    return 0
