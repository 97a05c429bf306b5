"""The status server in its own process: the board's mirror, requests that travel back to the
controller, and the process's lifecycle (priority, stop, the controller's death, bind errors)."""

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.cli.status import StatusClient
from controller.config import StatusConfig
from controller.status import link as link_mod
from controller.status import status_pb2 as pb
from controller.status.board import Phase, StatusBoard
from controller.status.link import Link
from controller.status.server import (
    SERVICE_NAME,
    StatusServerError,
    metrics_reply,
    start_status_server,
    step_message,
)

ROOT = Path(__file__).resolve().parents[3]


def make_board(**kw) -> StatusBoard:
    return StatusBoard(job_id="j-1", run_name="t", config_digest="abc", total_steps=100, **kw)


def _publish(board, step, **values):
    board.publish_step(step, {"step": float(step), **values}, policy_version=step)


def _records(board, n=10_000):
    return [(r.seq, r.step, r.time_unix, dict(r.values)) for r in board.window(n)]


def _state(board):
    ev = board.latest_eval()
    return (board.snapshot, board.published, _records(board),
            None if ev is None else (ev.seq, ev.step, ev.time_unix, dict(ev.values)),
            board.stop_event.is_set(), board.stop_reason, board.checkpoint_event.is_set(),
            board.checkpoint_hook is not None, board.closed)


def _alive(pid: int) -> bool:
    """False once `pid` has exited (a zombie nobody has reaped yet counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_until(cond, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# The mirror, in one process


def _mirror_of(board: StatusBoard) -> tuple[StatusBoard, list[tuple]]:
    """A board that follows `board` through pickled updates (as the server's process does)."""
    mirror = make_board(history=board.history, start_time=board.start_time)
    sent: list[tuple] = []

    def send(update):
        sent.append(update)
        mirror.apply(pickle.loads(pickle.dumps(update)))

    board.attach_mirror(send)
    return mirror, sent


def test_mirror_follows_every_change():
    board = make_board(history=3)
    for s in range(1, 6):  # before the mirror: it gets the 3 retained records, seqs 2..4
        _publish(board, s, r=s / 2)
    board.publish_eval(5, {"eval/accuracy": 0.5})
    mirror, _ = _mirror_of(board)
    heard = []
    mirror.add_listener(heard.append)
    assert _state(mirror) == _state(board)
    assert [r[0] for r in _records(mirror)] == [2, 3, 4]

    board.begin_step(honor_stop=True)
    _publish(board, 6, r=3.0, x=float("nan"))
    board.publish_eval(6, {"eval/accuracy": 0.75})
    board.checkpoint_hook = lambda step: None
    assert board.request_checkpoint()[0]
    assert board.begin_step(honor_stop=True) == (True, True)  # consumes the request
    board.request_stop("test")
    board.set_phase(Phase.STOPPED)
    board.close()
    assert repr(_state(mirror)) == repr(_state(board))  # repr: the NaN compares equal
    assert [r[1] for r in _records(mirror)] == [4, 5, 6]
    assert heard == [Phase.STOPPED]  # the mirror's listeners (health) hear it too
    with pytest.raises(RuntimeError, match="cannot take checkpoints"):
        mirror.checkpoint_hook(6)  # the hook itself stays with the controller


def test_an_update_made_while_sending_goes_out_after_it():
    """A change made on the thread that is sending (a signal handler's request_stop) neither
    deadlocks nor goes missing: it is queued and sent right after the current update."""
    board = make_board()
    mirror = make_board(start_time=board.start_time)
    order = []

    def send(update):
        order.append(update[0])
        if update[0] == "snapshot" and not board.stop_event.is_set() and len(order) > 4:
            board.request_stop("SIGTERM")  # re-enters the board while its lock is held
            assert order[-1] == "snapshot"  # queued, not sent from inside this send
        mirror.apply(update)

    board.attach_mirror(send)
    board.set_phase(Phase.SAMPLING)
    assert order[-2:] == ["snapshot", "requests"]
    assert mirror.stop_event.is_set() and mirror.stop_reason == "SIGTERM"


# ---------------------------------------------------------------------------------------------
# The link


def _receive_all(link: Link, n: int) -> list[tuple]:
    got: list[tuple] = []
    deadline = time.monotonic() + 30
    while len(got) < n and not link.peer_closed and time.monotonic() < deadline:
        link.wait_readable(0.1)
        got += link.receive()
    return got


def test_link_sends_never_block_and_frames_arrive_whole_in_order():
    a, b = socket.socketpair()
    sender, receiver = Link(a, "test-sender"), Link(b, "test-receiver")
    try:
        payload = "x" * 10_000
        for i in range(1000):  # ~10 MB, unread: far more than the socket's buffer holds
            sender.send(("m", i, payload))
        assert sender._backlog or sender._outbox  # the socket was full, and send returned
        got = _receive_all(receiver, 1000)  # the flusher writes the rest as the peer reads
        assert [m[1] for m in got] == list(range(1000)) and all(m[2] == payload for m in got)
    finally:
        sender.close()
        receiver.close()


def test_link_gives_up_on_a_peer_that_stops_reading(monkeypatch):
    monkeypatch.setattr(link_mod, "MAX_BACKLOG", 1 << 20)
    a, b = socket.socketpair()
    sender, receiver = Link(a, "test-sender"), Link(b, "test-receiver")
    try:
        for i in range(1000):
            sender.send(("m", i, "x" * 10_000))  # never raises, never blocks
        assert sender.closed
        got = _receive_all(receiver, 1000)
        assert receiver.peer_closed and len(got) < 1000  # the end of the stream, not a hang
        assert [m[1] for m in got] == list(range(len(got)))  # whole frames, in order
    finally:
        sender.close()
        receiver.close()


# ---------------------------------------------------------------------------------------------
# The server's process


@pytest.fixture
def served():
    board = make_board()
    server = start_status_server(StatusConfig(), board)
    client = StatusClient(server.address)
    yield board, server, client
    client.close()
    server.stop(0)


def _same(a, b) -> bool:
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_replies_equal_what_the_board_holds(served):
    """Each reply is what the controller's board holds at the time of the call: no waiting
    for the server's process to catch up."""
    board, _, client = served
    board.set_phase(Phase.IDLE)
    for s in range(1, 8):
        board.begin_step(honor_stop=True)
        board.set_phase(Phase.TRAINING)
        _publish(board, s, r=s / 3, x=float("nan") if s % 2 else s * 1.5)
        if s == 4:
            board.publish_eval(s, {"eval/accuracy": 0.25, "eval/pass@4": 0.5})
        st, snap = client.status(), board.snapshot
        assert (st.phase_name, st.step, st.policy_version) == (snap.phase.value, s, s)
        assert st.start_time_unix == board.start_time and st.total_steps == 100
        for window in (1, 3, 10):
            assert _same(client.metrics(window), metrics_reply(board.window(window))), window
    assert _same(client.status().latest_eval, step_message(board.latest_eval()))
    board.set_phase(Phase.CHECKPOINTING)
    assert client.status().phase == pb.CHECKPOINTING
    replay = []
    for m in client.watch(from_step=5):
        replay.append(m)
        if m.step == 7:
            break
    assert len(replay) == 3
    assert all(_same(m, step_message(r)) for m, r in zip(replay, board.window(3), strict=True))


def test_stop_and_checkpoint_requests_reach_the_controller(served):
    board, _, client = served
    board.set_phase(Phase.IDLE)
    with pytest.raises(grpc.RpcError) as e:
        client.request_checkpoint()
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Job.set_checkpoint_hook" in e.value.details()
    assert not client.status().checkpointing_configured

    board.checkpoint_hook = lambda step: None
    assert client.status().checkpointing_configured
    board.begin_step(honor_stop=True)  # inside step 1
    reply = client.request_checkpoint()
    assert (reply.accepted, reply.after_step) == (True, 1)
    assert board.checkpoint_event.is_set()  # the controller's own board, in this process
    reply = client.request_stop("maintenance")
    assert (reply.accepted, reply.after_step) == (True, 1)
    assert reply.message == "the job will finish step 1 and save a checkpoint, then stop"
    assert board.stop_event.is_set() and board.stop_reason == "maintenance"
    st = client.status()
    assert st.stop_requested and st.checkpoint_requested

    _publish(board, 1)
    assert board.begin_step(honor_stop=True) == (False, False)  # the loop honours the stop
    assert board.take_checkpoint_request()
    assert not client.status().checkpoint_requested
    board.set_phase(Phase.STOPPED)
    assert not client.request_stop().accepted  # the board's answer, relayed
    assert client.status().phase == pb.STOPPED


def test_final_state_is_served_until_stop_then_the_process_exits():
    board = make_board()
    server = start_status_server(StatusConfig(), board)
    pid = server.pid
    client = StatusClient(server.address)
    health = health_pb2_grpc.HealthStub(client.channel)

    def health_status():
        return health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                            timeout=5).status

    try:
        # Below the controller's priority; Ctrl-C (SIGINT to the process group) leaves it up.
        if hasattr(os, "getpriority"):
            want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
            assert os.getpriority(os.PRIO_PROCESS, pid) == want
        os.kill(pid, signal.SIGINT)
        assert health_status() == health_pb2.HealthCheckResponse.SERVING
        board.set_phase(Phase.FAILED, error="boom")
        assert health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
        st = client.status()
        assert st.phase == pb.FAILED and st.last_error == "boom"
        assert _alive(pid)
    finally:
        server.stop(1)
        client.close()
    assert server.process.returncode == 0
    assert not _alive(pid)
    server.stop(1)  # idempotent


PARENT = """
import sys, time
from controller.config import StatusConfig
from controller.status.board import StatusBoard
from controller.status.server import start_status_server

board = StatusBoard(job_id="j-1", run_name="t", config_digest="abc", total_steps=1)
server = start_status_server(StatusConfig(), board)
print(server.pid, server.address, flush=True)
time.sleep(600)
"""


def test_server_process_exits_when_the_controller_is_killed():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env=env)
    try:
        pid_text, address = parent.stdout.readline().split()
        pid = int(pid_text)
        client = StatusClient(address)
        assert client.status().job_id == "j-1"  # it serves
        client.close()
        parent.send_signal(signal.SIGKILL)  # no atexit, no close: the socket just ends
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the status server outlived its controller"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_port_held_by_another_socket_is_a_clear_error():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        before = {t.name for t in threading.enumerate()}
        with pytest.raises(StatusServerError,
                           match=rf"status.host='127.0.0.1' status.port={port}: cannot bind "
                                 rf"127.0.0.1:{port} .*fix: status.port=0 picks a free port"):
            start_status_server(StatusConfig(port=port), make_board())
    assert "tandem-status-link" not in {t.name for t in threading.enumerate()} - before
