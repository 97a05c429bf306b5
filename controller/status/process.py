"""The status server's own process: the gRPC service over a mirror of the controller's board.

    python -m controller.status.process FD PARENT_PID    # started by start_status_server

FD is this end of the socket to the controller (controller/status/link.py). What arrives on it:
"start" (the config, token, TLS key pair and the job's facts), the board's state and then each
change (applied to the mirror `StatusBoard`), "synced" once the state is complete, then
"topology", "stats" requests, "reply" (to a forwarded stop or checkpoint request) and at the
end "shutdown". What this process sends: "ready" with the bound port (or "error" with the
message the controller raises), "request_stop" / "request_checkpoint", and "stats" answers.

It runs at a lower CPU priority (nice +10) so that on a busy machine its work yields to the
training loop's. It ignores SIGINT and SIGTERM (a Ctrl-C or a supervisor's SIGTERM to the whole
process group starts the controller's graceful stop, during which the status is still served)
and exits when the controller asks, or when the controller's end of the socket closes or its
pid changes (it exited or died: this process is never left behind).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import sys
import threading
from concurrent import futures

import grpc

from controller.status import status_pb2 as pb
from controller.status.board import StatusBoard
from controller.status.link import Link
from controller.status.server import (
    START_TIMEOUT_S,
    StatusServerError,
    StatusServicer,
    build_server,
    set_serving,
)

NICENESS = 10  # added to the controller's: the server runs when the loop leaves a core free
CONTROL_TIMEOUT_S = 30.0  # for the controller to answer a forwarded stop / checkpoint request
ORPHAN_GRACE_S = 1.0  # watch streams get this long to end when the controller has gone
PARENT_CHECK_S = 1.0  # how often the controller's pid is checked


class ControllerProxy:
    """Forwards RequestStop / RequestCheckpoint to the controller and waits for its answer."""

    def __init__(self, link: Link):
        self._link = link
        self._ids = itertools.count()
        self._pending: dict[int, futures.Future] = {}

    def request_stop(self, reason: str) -> tuple[bool, int, str]:
        return self._call("request_stop", reason)

    def request_checkpoint(self) -> tuple[bool, int, str]:
        return self._call("request_checkpoint")

    def _call(self, kind: str, *args: object) -> tuple[bool, int, str]:
        if self._link.closed or self._link.peer_closed:
            raise ConnectionError("the controller has gone")
        key = next(self._ids)
        fut: futures.Future = futures.Future()
        self._pending[key] = fut
        try:
            self._link.send((kind, key, *args))
            return fut.result(CONTROL_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(f"no answer in {CONTROL_TIMEOUT_S:.0f} s") from None
        finally:
            self._pending.pop(key, None)

    def resolve(self, key: int, answer: tuple[bool, int, str]) -> None:
        fut = self._pending.get(key)
        if fut is not None:
            fut.set_result(tuple(answer))

    def fail_all(self) -> None:
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(ConnectionError("the controller has gone"))


class Mirror:
    """Applies what the controller sends, in order, from whichever thread catches up first."""

    def __init__(self, link: Link, board: StatusBoard, controller: ControllerProxy):
        self.link = link
        self.board = board
        self.controller = controller
        self.servicer: StatusServicer | None = None
        self.synced = False
        self.shutdown_grace: float | None = None  # set by "shutdown", or when orphaned
        self.shutdown = threading.Event()
        self._lock = threading.Lock()  # one applier at a time: updates apply in order

    def catch_up(self) -> None:
        """Applies every message that has arrived (a non-blocking read)."""
        with self._lock:
            for msg in self.link.receive():
                self.handle(msg)
            if self.link.peer_closed:
                self.stop(ORPHAN_GRACE_S)

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "synced":
            self.synced = True
        elif kind == "topology":
            self.servicer.topology = pb.TopologyReply.FromString(msg[1])
        elif kind == "reply":
            self.controller.resolve(msg[1], msg[2])
        elif kind == "stats":
            self.link.send(("stats", msg[1], self.servicer.stats()))
        elif kind == "shutdown":
            self.stop(msg[1])
        else:
            self.board.apply(msg)

    def stop(self, grace: float) -> None:
        if self.shutdown_grace is None:
            self.shutdown_grace = grace
        self.shutdown.set()


class CatchUp(grpc.ServerInterceptor):
    """Applies the controller's pending updates before each call is answered.

    A change the controller published before a client sent its request is then in the reply,
    even when this process's reader thread has not run yet (a non-blocking read per call).
    """

    def __init__(self, mirror: Mirror):
        self._mirror = mirror

    def intercept_service(self, continuation, handler_call_details):
        self._mirror.catch_up()
        return continuation(handler_call_details)


def main(argv: list[str]) -> int:
    fd, parent_pid = int(argv[0]), int(argv[1])
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # not on every platform
        os.nice(NICENESS)
    link = Link(socket.socket(fileno=fd), "tandem-status-server")

    def parent_alive() -> bool:
        return os.getppid() == parent_pid

    start = link.receive_one(START_TIMEOUT_S, alive=parent_alive)
    if start is None or start[0] != "start":
        return 1
    _, cfg, token, tls, facts = start
    board = StatusBoard(**facts)
    controller = ControllerProxy(link)
    mirror = Mirror(link, board, controller)
    try:
        server, servicer, health, port = build_server(cfg, board, controller, token, tls,
                                                      [CatchUp(mirror)])
    except StatusServerError as e:
        link.send(("error", str(e)))
        link.flushed(10)
        return 0
    mirror.servicer = servicer
    # The board's state first, so that the first reply is already the controller's.
    while not mirror.synced:
        msg = link.receive_one(START_TIMEOUT_S, alive=parent_alive)
        if msg is None:
            return 1
        mirror.handle(msg)
    set_serving(health, not board.snapshot.phase.terminal)
    board.add_listener(lambda phase: set_serving(health, not phase.terminal))
    server.start()
    link.send(("ready", port))

    def follow() -> None:
        while not mirror.shutdown.is_set():
            link.wait_readable(PARENT_CHECK_S)
            mirror.catch_up()
            if not parent_alive():
                mirror.stop(ORPHAN_GRACE_S)

    threading.Thread(target=follow, name="tandem-status-follow", daemon=True).start()
    mirror.shutdown.wait()
    # NOT_SERVING, then the watch streams drain what is left and end, then the server stops.
    set_serving(health, False)
    board.close()
    controller.fail_all()
    server.stop(mirror.shutdown_grace).wait()
    link.flushed(1.0)
    link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
