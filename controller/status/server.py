"""The gRPC status service (`tandem.v1.TandemStatus`, see controller/status.proto).

The service runs in a child process of the controller (controller/status/process.py), so
gRPC's work for each call and streamed message (its I/O and poller threads, the handlers) never
takes the controller's GIL, and what clients cost the loop does not grow with their number. The
controller keeps the `StatusBoard` the loop publishes to; each change is sent once over a socket
(controller/status/link.py), and the child answers from a mirror of the board, so no RPC waits
for the loop and the loop never waits for an RPC. RequestStop and RequestCheckpoint travel back
to the controller, whose board answers them. The child also serves standard health checking
(`grpc.health.v1.Health`: SERVING while the job can still step, NOT_SERVING once it has stopped
or failed) and server reflection, so `grpcurl` and load balancers work.

Security: the server binds loopback by default. Binding any other address needs a bearer token
(`status.token`, or the env var `status.token_env`), which an interceptor checks on every RPC
(health and reflection included): clients send `authorization: Bearer <token>`. TLS is on
when `status.tls_cert` and `status.tls_key` are set.
"""

from __future__ import annotations

import hmac
import ipaddress
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controller.config import ConfigError, StatusConfig
from controller.status import status_pb2 as pb
from controller.status import status_pb2_grpc as pb_grpc
from controller.status.board import StatusBoard, StepRecord, WatcherBehind, window_stats
from controller.status.link import Link

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TandemStatus"].full_name  # tandem.v1.TandemStatus
DEFAULT_WINDOW = 10
STEP_CACHE = 1024  # StepMetrics kept for watchers (a replay beyond it rebuilds older ones)
METRICS_CACHE = 64  # MetricsReply entries before those of older steps are dropped
# Unary RPCs need free workers; each open WatchMetrics stream holds one for its lifetime.
RESERVED_UNARY_WORKERS = 4
START_TIMEOUT_S = 60.0  # for the server process to import gRPC, bind and report its port


class StatusServerError(ConfigError):
    """The status server cannot start with this config (the message names field and fix)."""


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname other than localhost: may resolve anywhere


def format_address(host: str, port: int) -> str:
    """host:port, with IPv6 literals bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def resolve_token(cfg: StatusConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token: `status.token`, else the env var `status.token_env`, else None."""
    if cfg.token is not None:
        return cfg.token.get_secret_value()
    env = os.environ if environ is None else environ
    return env.get(cfg.token_env) or None


def check_bind(cfg: StatusConfig, token: str | None) -> None:
    """Refuses a non-loopback bind without a token (before anything else is started)."""
    if not is_loopback(cfg.host) and token is None:
        raise StatusServerError(
            f"status.host={cfg.host!r} is not a loopback address and no bearer token is set; "
            f"the status service would be open to the network (fix: set the env var "
            f"{cfg.token_env}=<secret> or status.token=<secret>, or use status.host=127.0.0.1)")


# ---------------------------------------------------------------------------------------------
# Converting the board's plain objects to messages


def step_message(r: StepRecord) -> pb.StepMetrics:
    return pb.StepMetrics(step=r.step, time_unix=r.time_unix, values=dict(r.values))


def metrics_reply(records: list[StepRecord]) -> pb.MetricsReply:
    """The GetMetrics reply for a window of records (the latest last)."""
    reply = pb.MetricsReply(window=len(records))
    if records:
        reply.latest.CopyFrom(step_message(records[-1]))
        reply.first_step = records[0].step
        windowed = reply.windowed
        for k, st in window_stats(records).items():
            m = windowed[k]  # set in place: half the cost of CopyFrom(MetricStats(...))
            m.mean, m.std, m.min, m.max, m.count = st.mean, st.std, st.min, st.max, st.count
    return reply


def topology_message(meshes: Any, trainer_shardings: Any, sampler_shardings: Any,
                     shapes: Any, backend: str) -> pb.TopologyReply:
    """Devices, the two sub-meshes (controller.topology.SubMesh) and per-parameter specs
    (sampler_shardings None: a sampler that places weights itself; its specs are empty).

    Built once, on the loop's thread, when the job has its meshes; served as is afterwards.
    """
    import jax

    reply = pb.TopologyReply(backend=backend, summary=meshes.describe())
    for sub, dst in ((meshes.trainer, reply.trainer), (meshes.sampler, reply.sampler)):
        dst.name = sub.name
        for axis, size in sub.mesh.shape.items():
            dst.axes[axis] = int(size)
            dst.axis_order.append(axis)
        for d in sub.mesh.devices.flat:
            dst.device_ids.append(int(d.id))
            reply.devices.append(pb.Device(
                id=int(d.id), platform=str(d.platform), kind=str(getattr(d, "device_kind", "")),
                process_index=int(getattr(d, "process_index", 0)), mesh=sub.name))
        for logical, physical in sub.rules.items():
            dst.rules[logical] = physical or ""
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    t_leaves = jax.tree.leaves(trainer_shardings)
    s_leaves = (jax.tree.leaves(sampler_shardings) if sampler_shardings is not None
                else [None] * len(t_leaves))
    for (path, leaf), t, s in zip(flat_shapes, t_leaves, s_leaves, strict=True):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        reply.params.append(pb.ParamSharding(
            path=name, shape=[int(x) for x in leaf.shape], dtype=str(leaf.dtype),
            trainer_spec=str(t.spec), sampler_spec="" if s is None else str(s.spec)))
    return reply


def _printable(text: str) -> str:
    """Metadata values must be printable ASCII."""
    return "".join(c if " " <= c <= "~" else " " for c in text)


# ---------------------------------------------------------------------------------------------
# The service


class Controller(Protocol):
    """Where RequestStop and RequestCheckpoint go: the controller's board, or a proxy for it.

    Each returns (accepted, after_step, message), as `StatusBoard.request_*` do; a proxy raises
    TimeoutError or ConnectionError when the controller does not answer.
    """

    def request_stop(self, reason: str) -> tuple[bool, int, str]: ...

    def request_checkpoint(self) -> tuple[bool, int, str]: ...


@dataclass(frozen=True)
class ServerStats:
    """What the status server has done so far (`StatusServer.stats()`)."""

    open_watchers: int  # WatchMetrics streams open now
    metrics_replies_built: int  # MetricsReply messages built: one per step and window
    step_messages_built: int  # StepMetrics built for watchers: one per step
    eval_messages_built: int  # latest_eval messages built: one per evaluation


class StatusServicer(pb_grpc.TandemStatusServicer):
    """Answers from the board (the controller's mirror); never calls into the loop.

    What a client costs the server's process: each step's `StepMetrics` and each (step,
    window)'s `MetricsReply` are built once, on the first request that needs them, and the same
    message object is handed to every client that asks (serialising it again per client costs
    ~1-3 us). A `StatusReply` is built per call (its uptime moves), but the latest evaluation in
    it is converted once per evaluation and copied in. What is left per client is gRPC's own
    work for each call or streamed message, across its I/O threads, its poller thread and a
    handler thread: on a 2-core VM ~0.15 ms of CPU per streamed message and 0.3-1 ms per unary
    call (the less often calls come, the more of it is waking idle threads; see
    bench/status_load.py). That is why the server has a process of its own.
    """

    def __init__(self, board: StatusBoard, max_watchers: int,
                 controller: Controller | None = None):
        self.board = board
        self.controller = board if controller is None else controller
        self.topology: pb.TopologyReply | None = None  # set once the meshes exist
        self.max_watchers = max_watchers
        self._watchers = 0
        self._lock = threading.Lock()
        # (records published, window) -> reply; all pollers of one step share one reply.
        self._metrics_cache: dict[tuple[int, int], pb.MetricsReply] = {}
        self._metrics_lock = threading.Lock()  # one builder per reply; hits take no lock
        # seq -> message, for watchers: the live steps of every stream share one message.
        self._step_cache: dict[int, pb.StepMetrics] = {}
        self._step_lock = threading.Lock()
        # (the board's latest eval record, its message); swapped whole, so hits take no lock.
        self._eval_msg: tuple[StepRecord, pb.StepMetrics] | None = None
        self._eval_lock = threading.Lock()
        # Messages built so far; tests check they count steps, not clients.
        self.metrics_replies_built = 0
        self.step_messages_built = 0
        self.eval_messages_built = 0

    def _step_msg(self, r: StepRecord) -> pb.StepMetrics:
        msg = self._step_cache.get(r.seq)
        if msg is not None:
            return msg
        with self._step_lock:
            msg = self._step_cache.get(r.seq)  # another watcher may have built it meanwhile
            if msg is None:
                msg = step_message(r)
                self.step_messages_built += 1
                if len(self._step_cache) >= STEP_CACHE:
                    del self._step_cache[next(iter(self._step_cache))]  # the oldest insert
                self._step_cache[r.seq] = msg
        return msg

    def _latest_eval_msg(self) -> pb.StepMetrics | None:
        ev = self.board.latest_eval()
        if ev is None:
            return None
        cached = self._eval_msg
        if cached is not None and cached[0] is ev:
            return cached[1]
        with self._eval_lock:
            cached = self._eval_msg  # another caller may have built it meanwhile
            if cached is None or cached[0] is not ev:
                cached = (ev, step_message(ev))
                self.eval_messages_built += 1
                self._eval_msg = cached
        return cached[1]

    def GetStatus(self, request, context):
        b, s = self.board, self.board.snapshot
        reply = pb.StatusReply(
            job_id=b.job_id, run_name=b.run_name, config_digest=b.config_digest,
            phase=pb.Phase.Value(s.phase.name), phase_name=s.phase.value, step=s.step,
            total_steps=b.total_steps, policy_version=s.policy_version,
            start_time_unix=b.start_time, uptime_s=b.uptime(), last_error=s.last_error,
            stop_requested=b.stop_event.is_set(),
            checkpoint_requested=b.checkpoint_event.is_set(),
            checkpointing_configured=b.checkpoint_hook is not None)
        ev = self._latest_eval_msg()
        if ev is not None:  # left unset before the first evaluation
            reply.latest_eval.CopyFrom(ev)
        return reply

    def GetMetrics(self, request, context):
        window = request.window or DEFAULT_WINDOW
        if window < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"window={window}: must be >= 0 (fix: e.g. window=10; 0 means 10)")
        window = min(window, self.board.history)
        reply = self._metrics_cache.get((self.board.published, window))
        if reply is not None:
            return reply
        with self._metrics_lock:
            # The window and its key are read together, so a step published meanwhile gives a
            # newer reply under its own key, never a newer reply under an older key.
            published, records = self.board.window_at(window)
            reply = self._metrics_cache.get((published, window))
            if reply is None:
                reply = metrics_reply(records)
                self.metrics_replies_built += 1
                if len(self._metrics_cache) >= METRICS_CACHE:  # drop older steps' replies
                    for key in [k for k in self._metrics_cache if k[0] < published]:
                        del self._metrics_cache[key]
                    if len(self._metrics_cache) >= METRICS_CACHE:  # many windows of one step
                        self._metrics_cache.clear()
                self._metrics_cache[(published, window)] = reply
        return reply

    def WatchMetrics(self, request, context):
        board = self.board
        # Fixed before the stream counts as open: a step published after this is seen.
        next_seq = (board.first_seq_at(request.from_step) if request.from_step > 0
                    else board.published)
        with self._lock:
            if self._watchers >= self.max_watchers:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self._watchers} WatchMetrics streams are open, the most this server "
                    f"allows (fix: raise status.max_workers, now "
                    f"{self.max_watchers + RESERVED_UNARY_WORKERS})")
            self._watchers += 1
        gone = threading.Event()

        def on_done() -> None:
            gone.set()
            self.board.wake()

        context.add_callback(on_done)
        try:
            while not gone.is_set():
                try:
                    records = board.wait_records(next_seq, timeout=1.0, cancelled=gone.is_set)
                except WatcherBehind as e:
                    context.abort(grpc.StatusCode.DATA_LOSS, str(e))
                if not records:
                    if board.closed and board.published <= next_seq:
                        # The job has ended and this watcher has seen every step; the
                        # trailer says how it ended (the server is about to go away).
                        s = board.snapshot
                        context.set_trailing_metadata((
                            ("tandem-phase", s.phase.value),
                            ("tandem-step", str(s.step)),
                            ("tandem-policy-version", str(s.policy_version)),
                            ("tandem-last-error", _printable(s.last_error)[:1000])))
                        return
                    continue
                for r in records:
                    yield self._step_msg(r)
                next_seq = records[-1].seq + 1
        finally:
            with self._lock:
                self._watchers -= 1

    @property
    def open_watchers(self) -> int:
        """WatchMetrics streams open now."""
        return self._watchers

    def GetTopology(self, request, context):
        if self.topology is None:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"the topology is not built yet (phase "
                          f"{self.board.snapshot.phase.value}); retry in a few seconds")
        return self.topology

    def stats(self) -> dict[str, int]:
        """ServerStats' fields, now."""
        return {"open_watchers": self._watchers,
                "metrics_replies_built": self.metrics_replies_built,
                "step_messages_built": self.step_messages_built,
                "eval_messages_built": self.eval_messages_built}

    def _ask(self, context, request: Callable[[], tuple[bool, int, str]]) -> tuple:
        try:
            return request()
        except (TimeoutError, ConnectionError) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"the controller did not answer ({e}); retry in a few seconds")

    def RequestCheckpoint(self, request, context):
        accepted, after, message = self._ask(context, self.controller.request_checkpoint)
        if not accepted:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
        return pb.RequestCheckpointReply(accepted=True, after_step=after, message=message)

    def RequestStop(self, request, context):
        reason = request.reason or "requested over gRPC"
        accepted, after, message = self._ask(context,
                                             lambda: self.controller.request_stop(reason))
        return pb.RequestStopReply(accepted=accepted, after_step=after, message=message)


# ---------------------------------------------------------------------------------------------
# Authentication


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects every RPC whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        got = ""
        for k, v in handler_call_details.invocation_metadata or ():
            if k == "authorization":
                got = v
                break
        # Constant-time compare: the token is a secret.
        if hmac.compare_digest(got.encode(), self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        msg = ("missing or wrong bearer token (fix: send metadata 'authorization: Bearer "
               "<token>'; `tandem status --token` or the env var does this)")

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

        if handler is None:
            return None
        # Answer with the same cardinality as the method, so the client sees a clean status.
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


# ---------------------------------------------------------------------------------------------
# The gRPC server (built in the server's process)


def read_tls(cfg: StatusConfig) -> tuple[bytes, bytes] | None:
    """(key, certificate chain) PEM bytes, or None without TLS."""
    if cfg.tls_cert is None:
        return None
    try:
        with open(cfg.tls_key, "rb") as f:
            key = f.read()
        with open(cfg.tls_cert, "rb") as f:
            cert = f.read()
    except OSError as e:
        raise StatusServerError(
            f"status.tls_cert={cfg.tls_cert!r} / status.tls_key={cfg.tls_key!r}: "
            f"cannot read ({e}) (fix: point both at readable PEM files)") from None
    return key, cert


def build_server(cfg: StatusConfig, board: StatusBoard, controller: Controller,
                 token: str | None, tls: tuple[bytes, bytes] | None,
                 interceptors: list[grpc.ServerInterceptor]
                 ) -> tuple[grpc.Server, StatusServicer, health.HealthServicer, int]:
    """The server (bound, not started), its servicer, its health servicer and the bound port.

    `interceptors` run first on every call, then the bearer-token check (with a token).
    Raises StatusServerError (naming the field and a fix) if the address cannot be bound.
    """
    if token:
        interceptors = [*interceptors, BearerTokenInterceptor(token)]
    max_watchers = max(1, cfg.max_workers - RESERVED_UNARY_WORKERS)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.max_workers,
                                   thread_name_prefix="tandem-status"),
        interceptors=interceptors,
        options=[
            ("grpc.so_reuseport", 0),  # two jobs must not silently share a port
            # BDP probing sizes the window for data this server *receives*; requests here are a
            # few bytes, and the probe's PING round trips cost gRPC's I/O threads ~30% of their
            # time under 50 pollers + 10 watchers (bench/status_load.py).
            ("grpc.http2.bdp_probe", 0),
        ],
    )
    servicer = StatusServicer(board, max_watchers, controller)
    pb_grpc.add_TandemStatusServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)

    bind = format_address(cfg.host, cfg.port)
    try:
        if tls is not None:
            port = server.add_secure_port(bind, grpc.ssl_server_credentials([tls]))
        else:
            port = server.add_insecure_port(bind)
    except RuntimeError as e:
        raise StatusServerError(
            f"status.host={cfg.host!r} status.port={cfg.port}: cannot bind {bind} ({e}) "
            f"(fix: status.port=0 picks a free port)") from None
    if not port:
        raise StatusServerError(
            f"status.host={cfg.host!r} status.port={cfg.port}: cannot bind {bind} (in use, or "
            f"not an address of this machine) (fix: status.port=0 picks a free port)")
    return server, servicer, health_servicer, port


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    st = (health_pb2.HealthCheckResponse.SERVING if serving
          else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, st)


# ---------------------------------------------------------------------------------------------
# The controller's side: start the server's process, feed it the board, answer its requests


class StatusServer:
    """The controller's handle on its running status server process; `stop()` ends it.

    A thread here ("tandem-status-link") reads what the process sends: stop and checkpoint
    requests, which it passes to the board, and the answers to `stats()`. It wakes only for
    those, never per client call.
    """

    def __init__(self, process: subprocess.Popen, link: Link, board: StatusBoard, address: str,
                 port: int, tls: bool, token_required: bool):
        self.process = process
        self.board = board
        self.address = address  # host:port actually bound
        self.port = port
        self.tls = tls
        self.token_required = token_required
        self._link = link
        self._ids = itertools.count()
        self._pending: dict[int, futures.Future] = {}
        self._stopped = False
        self._reader = threading.Thread(target=self._read, name="tandem-status-link",
                                        daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """The server process's pid (its CPU is what clients cost the machine)."""
        return self.process.pid

    def set_topology(self, reply: pb.TopologyReply) -> None:
        """Serves `reply` to GetTopology from now on (serialised once, here)."""
        self._link.send(("topology", reply.SerializeToString()))

    def stats(self, timeout: float = 10.0) -> ServerStats:
        """Asks the server process for its counters (open watch streams, messages built)."""
        key = next(self._ids)
        fut: futures.Future = futures.Future()
        self._pending[key] = fut
        try:
            if self._link.closed or self._link.peer_closed:
                raise StatusServerError("the status server process has exited")
            self._link.send(("stats", key))
            return fut.result(timeout)
        finally:
            self._pending.pop(key, None)

    def _read(self) -> None:
        link = self._link
        while not link.peer_closed:
            link.wait_readable(None)
            for msg in link.receive():
                kind = msg[0]
                if kind == "request_stop":
                    link.send(("reply", msg[1], self.board.request_stop(msg[2])))
                elif kind == "request_checkpoint":
                    link.send(("reply", msg[1], self.board.request_checkpoint()))
                elif kind == "stats":
                    fut = self._pending.get(msg[1])
                    if fut is not None:
                        fut.set_result(ServerStats(**msg[2]))
        if not self._stopped:
            log.warning("the status server process (pid %d) has exited; the job goes on "
                        "without it", self.process.pid)
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(StatusServerError("the status server process has exited"))

    def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, end watch streams (they drain first), then stop within `grace` s.

        Idempotent. The process is killed if it has not exited `grace` + 10 s later.
        """
        if self._stopped:
            return
        self._stopped = True
        self.board.close()  # the streams' end, sent to the mirror like any change
        self.board.detach_mirror()
        self._link.send(("shutdown", grace))
        self._link.flushed(grace + 10)
        try:
            self.process.wait(grace + 10)
        except subprocess.TimeoutExpired:
            log.warning("the status server process (pid %d) did not stop in %.0f s; killing it",
                        self.process.pid, grace + 10)
            self.process.kill()
            self.process.wait()
        self._link.close()
        self._reader.join(5)


def _child_env() -> dict[str, str]:
    """The environment for the server's process: this checkout's packages first."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def start_status_server(cfg: StatusConfig, board: StatusBoard,
                        token: str | None = None) -> StatusServer:
    """Starts the status server's process for `board`; returns once it serves, bound.

    `token` defaults to `resolve_token(cfg)`. Raises StatusServerError (naming the field and a
    fix) for a non-loopback host without a token, unreadable TLS files, or a port in use.
    """
    token = resolve_token(cfg) if token is None else token
    check_bind(cfg, token)
    tls = read_tls(cfg)
    # A fresh interpreter (not a fork: this process holds JAX's threads) that imports gRPC and
    # this package only. The socket's far end is its only inherited descriptor; when this
    # process exits or dies the child reads the end of the stream and stops.
    here, there = socket.socketpair()
    with there:
        process = subprocess.Popen(
            [sys.executable, "-m", "controller.status.process", str(there.fileno()),
             str(os.getpid())],
            pass_fds=(there.fileno(),), stdin=subprocess.DEVNULL, env=_child_env())
    link = Link(here, "tandem-status-link")
    facts = {"job_id": board.job_id, "run_name": board.run_name,
             "config_digest": board.config_digest, "total_steps": board.total_steps,
             "history": board.history, "start_time": board.start_time}
    link.send(("start", cfg, token, tls, facts))
    board.attach_mirror(link.send)  # the board's state now, then every change
    link.send(("synced",))
    # The child binds, applies the state, starts serving, then reports the port (or an error).
    reply = link.receive_one(START_TIMEOUT_S, alive=lambda: process.poll() is None)
    if reply is None or reply[0] != "ready":
        board.detach_mirror()
        link.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if reply is not None and reply[0] == "error":
            raise StatusServerError(reply[1])
        raise StatusServerError(
            f"the status server process did not report its port within {START_TIMEOUT_S:.0f} s "
            f"(exit code {process.returncode}; its error, if any, is above) (fix: check that "
            f"`{sys.executable} -m controller.status.process` can import grpc, or set "
            f"status.enabled=false)")
    return StatusServer(process, link, board, format_address(cfg.host, reply[1]), reply[1],
                        tls is not None, token is not None)
