"""The status board, the gRPC server without a job (auth, watch semantics), and stub drift."""

import collections
import importlib.util
import math
import random
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.cli.status import StatusClient
from controller.config import StatusConfig, load_config
from controller.status import status_pb2 as pb
from controller.status.board import Phase, StatusBoard, WatcherBehind, window_stats
from controller.status.server import (
    SERVICE_NAME,
    StatusServerError,
    check_bind,
    format_address,
    is_loopback,
    resolve_token,
    start_status_server,
)


def make_board(**kw) -> StatusBoard:
    return StatusBoard(job_id="j-1", run_name="t", config_digest="abc", total_steps=100, **kw)


# ---------------------------------------------------------------------------------------------
# Generated stubs


def test_checked_in_stubs_match_the_proto(tmp_path):
    """Regenerates the stubs; the checked-in ones must describe the same proto (and, with the
    pinned grpcio-tools, be byte-identical)."""
    from controller.status import gen_stubs as gen

    out = gen.generate(tmp_path)
    # The serialized FileDescriptorProto: the proto's meaning, whatever generator wrote it.
    fresh_pb = out[0].read_text().split("AddSerializedFile(", 1)[1].split(")\n", 1)[0]
    checked = (gen.ROOT / gen.STUBS[0]).read_text()
    checked_pb = checked.split("AddSerializedFile(", 1)[1].split(")\n", 1)[0]
    assert fresh_pb == checked_pb, (
        "controller/status/status_pb2.py is stale: the proto changed (fix: python -m "
        "controller.status.gen_stubs)")
    if gen.installed_tools_version() == gen.GRPCIO_TOOLS_VERSION:
        for fresh, name in zip(out, gen.STUBS, strict=True):
            assert fresh.read_text() == (gen.ROOT / name).read_text(), (
                f"{name} differs from grpcio-tools {gen.GRPCIO_TOOLS_VERSION}'s output "
                f"(fix: python -m controller.status.gen_stubs)")


def test_phase_enums_agree():
    assert {p.name for p in Phase} == set(pb.Phase.keys()) - {"PHASE_UNSPECIFIED"}


# ---------------------------------------------------------------------------------------------
# The board


def _publish(board, step, **values):
    board.publish_step(step, {"step": float(step), **values}, policy_version=step)


def test_window_stats_by_hand():
    board = make_board()
    _publish(board, 1, r=1.0)
    _publish(board, 2, r=2.0, x=float("nan"))
    _publish(board, 3, r=6.0, x=4.0)
    st = window_stats(board.window(3))
    # r: mean (1+2+6)/3 = 3; var ((1-3)^2 + (2-3)^2 + (6-3)^2)/3 = 14/3
    assert st["r"].mean == pytest.approx(3.0, abs=1e-12)
    assert st["r"].std == pytest.approx(math.sqrt(14 / 3), abs=1e-12)
    assert (st["r"].min, st["r"].max, st["r"].count) == (1.0, 6.0, 3)
    # x: the NaN is excluded and counted out, not averaged in as a zero.
    assert (st["x"].mean, st["x"].std, st["x"].count) == (4.0, 0.0, 1)
    assert [r.step for r in board.window(2)] == [2, 3]
    assert [r.step for r in board.window(50)] == [1, 2, 3]


def test_board_snapshot_phases_and_requests():
    board = make_board()
    seen = []
    board.add_listener(seen.append)
    assert board.snapshot.phase is Phase.STARTING
    board.set_phase("idle")
    # No checkpoint hook: the request is refused and says why.
    ok, _, msg = board.request_checkpoint()
    assert not ok and "not configured" in msg
    board.checkpoint_hook = lambda step: None
    assert board.begin_step(honor_stop=True) == (True, False)
    assert board.snapshot.phase is Phase.SAMPLING
    # Inside step 1: a checkpoint and a stop both take effect after step 1.
    assert board.request_checkpoint()[:2] == (True, 1)
    assert board.request_stop("test")[:2] == (True, 1)
    _publish(board, 1)
    assert board.snapshot.phase is Phase.IDLE and board.snapshot.step == 1
    assert board.begin_step(honor_stop=True) == (False, False)  # the stop wins
    assert board.begin_step(honor_stop=False) == (True, True)  # a manual step: ckpt first
    assert board.snapshot.phase is Phase.CHECKPOINTING
    board.set_phase(Phase.STOPPED)
    assert seen == [Phase.STOPPED]  # listeners hear terminal transitions only
    assert board.request_stop("again")[0] is False


def test_wait_records_and_history_limit():
    board = make_board(history=3)
    for s in range(1, 6):
        _publish(board, s)
    assert [r.step for r in board.wait_records(2, timeout=0)] == [3, 4, 5]
    with pytest.raises(WatcherBehind, match=r"status.history=3"):
        board.wait_records(1, timeout=0)
    assert board.wait_records(5, timeout=0.01) == []  # nothing new: times out empty
    assert board.first_seq_at(4) == 3
    board.close()
    assert board.wait_records(5, timeout=10) == []  # closed: returns at once


def test_latest_eval_is_absent_then_the_latest_wins():
    board = make_board()
    assert board.latest_eval() is None
    board.publish_eval(0, {"eval/accuracy": 0.125, "eval/prompts": 64})
    _publish(board, 1, r=1.0)  # a training step leaves the evaluation alone
    first = board.latest_eval()
    assert (first.seq, first.step, dict(first.values)) == (
        0, 0, {"eval/accuracy": 0.125, "eval/prompts": 64.0})
    assert type(first.values["eval/prompts"]) is float  # what the proto's double map holds
    board.publish_eval(50, {"eval/accuracy": 0.5, "eval/pass@4": 0.75})
    latest = board.latest_eval()
    assert (latest.seq, latest.step) == (1, 50) and latest.time_unix >= first.time_unix
    assert dict(latest.values) == {"eval/accuracy": 0.5, "eval/pass@4": 0.75}  # replaced
    with pytest.raises(TypeError):
        latest.values["eval/accuracy"] = 1.0  # read-only: readers share it
    assert dict(first.values)["eval/accuracy"] == 0.125  # a published record never changes


# ---------------------------------------------------------------------------------------------
# Security settings


def test_bind_rules():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    assert not is_loopback("example.com")
    assert format_address("::1", 5) == "[::1]:5"
    check_bind(StatusConfig(), None)  # loopback without a token: fine
    check_bind(StatusConfig(host="0.0.0.0"), "s3cret")  # a token makes it allowed
    with pytest.raises(StatusServerError, match=r"status.host='0.0.0.0'.*TANDEM_STATUS_TOKEN"):
        check_bind(StatusConfig(host="0.0.0.0"), None)


def test_token_from_config_or_env():
    cfg = load_config(overrides=["status.token=abc"]).status
    assert resolve_token(cfg, {}) == "abc"
    assert "abc" not in load_config(overrides=["status.token=abc"]).to_yaml()  # masked
    assert resolve_token(StatusConfig(), {"TANDEM_STATUS_TOKEN": "xyz"}) == "xyz"
    assert resolve_token(StatusConfig(token_env="MY_TOK"), {"MY_TOK": "q"}) == "q"
    assert resolve_token(StatusConfig(), {}) is None


def test_tls_needs_both_files():
    with pytest.raises(Exception, match=r"status.tls_cert is set but status.tls_key is not"):
        load_config(overrides=["status.tls_cert=/x.pem"])


def test_non_loopback_without_token_refuses_to_start(monkeypatch):
    monkeypatch.delenv("TANDEM_STATUS_TOKEN", raising=False)
    with pytest.raises(StatusServerError, match="no bearer token"):
        start_status_server(StatusConfig(host="0.0.0.0"), make_board())


# ---------------------------------------------------------------------------------------------
# A server over a bare board (no job): auth and streaming semantics


@pytest.fixture(scope="module")
def token_server():
    board = make_board()
    board.set_phase(Phase.IDLE)
    server = start_status_server(StatusConfig(), board, token="s3cret")
    yield board, server
    server.stop(0)


@pytest.mark.parametrize("token", [None, "wrong", "s3cret2"])
def test_wrong_or_missing_token_is_unauthenticated(token_server, token):
    _, server = token_server
    client = StatusClient(server.address, token)
    try:
        calls = [client.status, client.metrics, client.topology, client.request_stop,
                 lambda: list(client.watch())]
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, call
            assert "bearer token" in e.value.details()
        # Health and reflection are behind the token too.
        health = health_pb2_grpc.HealthStub(client.channel)
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5,
                         metadata=client.metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        client.close()


def test_right_token_is_served(token_server):
    _, server = token_server
    client = StatusClient(server.address, "s3cret")
    try:
        st = client.status()
        assert (st.job_id, st.config_digest, st.phase_name) == ("j-1", "abc", "idle")
        assert st.phase == pb.IDLE
        health = health_pb2_grpc.HealthStub(client.channel)
        r = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5,
                         metadata=client.metadata)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            client.topology()  # no job built meshes for this board
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as e:
            client.metrics(-1)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        client.close()


def test_watchers_see_every_step_once_in_order():
    """Many watchers, a publisher faster than some of them: each sees 1..N exactly once."""
    board = make_board()
    server = start_status_server(StatusConfig(), board)
    n_steps, n_watchers = 40, 6
    got: list[list[int]] = [[] for _ in range(n_watchers)]
    clients = [StatusClient(server.address) for _ in range(n_watchers)]

    def watch(i):
        for m in clients[i].watch():
            got[i].append(m.step)
            if i % 2:  # every other watcher is slow
                threading.Event().wait(0.002)

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(n_watchers)]
    for t in threads:
        t.start()
    deadline = threading.Event()
    while server.stats().open_watchers < n_watchers and not deadline.wait(0.01):
        pass
    for s in range(1, n_steps + 1):
        _publish(board, s, r=s / 10)
    replay = [m.step for m in _take(StatusClient(server.address).watch(from_step=35), 6)]
    server.stop(grace=5)  # closes the board: the streams drain, then end
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    for i in range(n_watchers):
        assert got[i] == list(range(1, n_steps + 1)), i
    assert replay == [35, 36, 37, 38, 39, 40]
    for c in clients:
        c.close()


def _take(it, n):
    out = []
    for x in it:
        out.append(x)
        if len(out) == n:
            it.cancel()
            break
    return out


def test_get_status_serves_the_latest_eval():
    """GetStatus leaves latest_eval unset before the first evaluation, then carries the latest
    one; its message is built once per evaluation, however many calls read it."""
    board = make_board()
    server = start_status_server(StatusConfig(), board)
    client = StatusClient(server.address)
    try:
        assert not client.status().HasField("latest_eval")
        board.publish_eval(10, {"eval/accuracy": 0.25, "eval/pass@4": 0.5,
                                "eval/accuracy/gsm8k": 0.25, "eval/time_s": 1.75})
        replies = [client.status() for _ in range(3)]
        for st in replies:
            assert st.HasField("latest_eval") and st.latest_eval.step == 10
            assert dict(st.latest_eval.values) == {
                "eval/accuracy": 0.25, "eval/pass@4": 0.5, "eval/accuracy/gsm8k": 0.25,
                "eval/time_s": 1.75}
            assert st.latest_eval.time_unix == board.latest_eval().time_unix
        assert server.stats().eval_messages_built == 1
        board.publish_eval(20, {"eval/accuracy": 0.5})
        st = client.status()
        assert st.latest_eval.step == 20 and dict(st.latest_eval.values) == {
            "eval/accuracy": 0.5}
        assert server.stats().eval_messages_built == 2
    finally:
        client.close()
        server.stop(0)


def test_eval_line_headline_order_and_notes():
    from controller.cli.status import eval_line

    values = {
        "eval/mean@4": 0.29, "eval/maj@4": 0.375, "eval/pass@16": 0.625, "eval/pass@4": 0.5,
        "eval/reward/mean": 0.29, "eval/accuracy": 0.3125, "eval/accuracy/gsm8k": 0.3125,
        "eval/reward/gsm8k": 0.29, "eval/time_s": 1.84, "eval/prompts": 64.0,
        "eval/samples": 256.0, "eval/rewards/failures": 0.0,
    }
    # pass@k sorts by k as a number (4 before 16); per-dataset keys, samples and zero
    # failures stay out of the line.
    assert eval_line(50, values) == (
        "eval (step 50): accuracy 0.312  pass@4 0.500  pass@16 0.625  maj@4 0.375  "
        "mean@4 0.290  reward 0.290  (64 prompts, 1.8 s)")
    values["eval/rewards/failures"] = 3.0
    assert eval_line(50, values).endswith("(64 prompts, 1.8 s, 3 reward failures)")
    # --all: the other keys follow the headline, sorted.
    assert eval_line(50, values, show_all=True) == (
        "eval (step 50): accuracy 0.312  pass@4 0.500  pass@16 0.625  maj@4 0.375  "
        "mean@4 0.290  reward 0.290  accuracy/gsm8k 0.3125  reward/gsm8k 0.2900  "
        "samples 256.0000  (64 prompts, 1.8 s, 3 reward failures)")
    assert eval_line(0, {"eval/accuracy": float("nan")}) == "eval (step 0): accuracy nan"


def test_cli_shows_the_latest_eval(capsys, monkeypatch):
    """`tandem status` prints the eval line under the status line (none before the first
    evaluation), --json carries every key, and --watch logs each new evaluation once."""
    import json

    from controller.cli import main

    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.delenv("TANDEM_STATUS_TOKEN", raising=False)
    board = make_board()
    board.set_phase(Phase.IDLE)
    server = start_status_server(StatusConfig(), board)
    base = ["status", "--address", server.address]
    try:
        assert main(base) == 0
        assert "eval (" not in capsys.readouterr().out
        assert main([*base, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["status"]["latest_eval"] is None
        board.publish_eval(0, {"eval/accuracy": 0.125, "eval/accuracy/gsm8k": 0.125,
                               "eval/prompts": 64, "eval/time_s": 2.0})
        assert main(base) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("job j-1 (config abc) | idle | step 0/100")
        assert lines[1] == "eval (step 0): accuracy 0.125  (64 prompts, 2.0 s)"
        assert main([*base, "--json"]) == 0
        ev = json.loads(capsys.readouterr().out)["status"]["latest_eval"]
        assert ev["step"] == 0 and ev["values"] == {
            "eval/accuracy": 0.125, "eval/accuracy/gsm8k": 0.125, "eval/prompts": 64.0,
            "eval/time_s": 2.0}

        # --watch to a log (not a terminal): the eval so far under the status line, then each
        # new one as a status poll (about once a second) first sees it.
        rc, out = [], []
        t = threading.Thread(target=lambda: rc.append(main([*base, "--watch"])))
        t.start()
        while server.stats().open_watchers < 1:
            threading.Event().wait(0.01)
        _publish(board, 1, **{"reward/mean": 0.5})
        board.publish_eval(1, {"eval/accuracy": 0.25, "eval/prompts": 64, "eval/time_s": 2.0})
        deadline = time.monotonic() + 20
        while not any("eval (step 1)" in x for x in out) and time.monotonic() < deadline:
            out += capsys.readouterr().out.splitlines()
            threading.Event().wait(0.05)
    finally:
        server.stop(5)  # closes the board: the watch drains and ends
    t.join(30)
    out += capsys.readouterr().out.splitlines()
    assert rc == [0]
    assert out[0].startswith("job j-1") and out[1] == (
        "eval (step 0): accuracy 0.125  (64 prompts, 2.0 s)")
    # The log, then the final frame, whose header is the status line and the latest eval.
    final = max(i for i, x in enumerate(out) if x.startswith("job j-1"))
    assert final > 1 and out[final + 1] == "eval (step 1): accuracy 0.250  (64 prompts, 2.0 s)"
    logged = [x for x in out[:final] if x.startswith("eval (")]
    assert logged == ["eval (step 0): accuracy 0.125  (64 prompts, 2.0 s)",
                      "eval (step 1): accuracy 0.250  (64 prompts, 2.0 s)"]  # each once


def test_json_has_numbers_enum_names_and_every_field():
    from controller.cli.status import to_dict

    msg = pb.StatusReply(step=7, phase=pb.TRAINING)
    d = to_dict(msg)
    assert d["step"] == 7 and d["phase"] == "TRAINING" and d["last_error"] == ""
    topo = to_dict(pb.TopologyReply(devices=[pb.Device(id=3, mesh="sampler")],
                                    trainer=pb.SubMesh(axes={"fsdp": 4}, device_ids=[0, 1])))
    assert topo["devices"][0]["id"] == 3 and topo["trainer"]["axes"] == {"fsdp": 4}
    assert topo["trainer"]["device_ids"] == [0, 1] and topo["sampler"] is None
    mr = to_dict(pb.MetricsReply(windowed={"r": pb.MetricStats(mean=1.5, count=2)}))
    assert mr["windowed"]["r"]["mean"] == 1.5 and mr["latest"] is None


def test_tls_with_token(tmp_path):
    """status.tls_cert/tls_key serve TLS: a client trusting the cert gets answers; a
    plaintext client does not."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
         "-out", str(cert)], check=True, capture_output=True)
    cfg = StatusConfig(tls_cert=str(cert), tls_key=str(key))
    server = start_status_server(cfg, make_board(), token="tok")
    try:
        assert server.tls and server.token_required
        secure = StatusClient(server.address, "tok", ca_cert=str(cert))
        assert secure.status().job_id == "j-1"
        secure.close()
        plain = StatusClient(server.address, "tok", timeout=3)
        with pytest.raises(grpc.RpcError) as e:
            plain.status()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        plain.close()
    finally:
        server.stop(0)
    bad = StatusConfig(tls_cert=str(tmp_path / "nope.pem"), tls_key=str(key))
    with pytest.raises(StatusServerError, match=r"status.tls_cert=.*cannot read"):
        start_status_server(bad, make_board())


def test_cli_against_a_bare_server(capsys, monkeypatch):
    """`tandem status`: table, --json, a bad token, and --watch --json replay + follow."""
    import json

    from controller.cli import main

    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.delenv("TANDEM_STATUS_TOKEN", raising=False)
    board = make_board()
    board.set_phase(Phase.IDLE)
    _publish(board, 1, **{"reward/mean": 0.25})
    _publish(board, 2, **{"reward/mean": 0.75})
    server = start_status_server(StatusConfig(), board, token="tok")
    base = ["status", "--address", server.address, "--token", "tok"]
    try:
        assert main(base) == 0
        table = capsys.readouterr().out
        assert "job j-1 (config abc) | idle | step 2/100" in table
        assert "step 2 | last 2 steps from step 1" in table and "reward/mean" in table
        assert main([*base, "--json", "--window", "2"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["status"]["step"] == 2 and d["status"]["phase"] == "IDLE"
        assert d["metrics"]["windowed"]["reward/mean"]["mean"] == 0.5  # (0.25 + 0.75) / 2
        assert "topology" not in d  # no job built meshes for this board
        assert main(["status", "--address", server.address, "--token", "bad"]) == 1
        err = capsys.readouterr().err
        assert "refused the call" in err and "--token" in err
        rc = []
        t = threading.Thread(target=lambda: rc.append(
            main([*base, "--watch", "--json", "--from-step", "2"])))
        t.start()
        while server.stats().open_watchers < 1:
            threading.Event().wait(0.01)
        _publish(board, 3, **{"reward/mean": 1.0})
    finally:
        server.stop(5)  # closes the board: the watch drains and ends
    t.join(30)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == [0] and [x["step"] for x in lines] == [2, 3]  # replayed 2, then live 3
    assert lines[1]["reward/mean"] == 1.0
    assert main(base) == 1  # the server is gone
    assert "no status server answers" in capsys.readouterr().err


def test_port_in_use_is_a_clear_error():
    first = start_status_server(StatusConfig(), make_board())
    try:
        with pytest.raises(StatusServerError, match=r"status.port=\d+: cannot bind .*port=0"):
            start_status_server(StatusConfig(port=first.port), make_board())
    finally:
        first.stop(0)


# ---------------------------------------------------------------------------------------------
# What clients cost the controller: counted, not timed


class CountingCondition(threading.Condition):
    """A Condition that counts, per notifying thread, how many waiting threads it woke."""

    def __init__(self):
        super().__init__()
        self.woken: collections.Counter[int] = collections.Counter()

    def notify(self, n=1):  # notify_all() calls notify(len(waiters))
        self.woken[threading.get_ident()] += min(n, len(self._waiters))  # CPython's waiters
        super().notify(n)


def _wait_until(cond, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.mark.parametrize("readers", [1, 8])
def test_publishing_wakes_one_reader_however_many_wait(readers):
    """The loop's thread wakes one waiting reader per step, for 1 reader or 8; the readers
    wake each other, and every one of them still gets every record once, in order."""
    board = make_board()
    board._cond = cond = CountingCondition()
    n_steps = 10
    got: list[list[int]] = [[] for _ in range(readers)]

    def read(i):
        seq = 0
        while seq < n_steps:
            for r in board.wait_records(seq, timeout=30):
                got[i].append(r.step)
                seq = r.seq + 1

    threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
    for t in threads:
        t.start()
    for s in range(1, n_steps + 1):
        # Every reader has had step s - 1 and waits for step s.
        _wait_until(lambda s=s: all(len(g) == s - 1 for g in got)
                    and len(cond._waiters) == readers)
        _publish(board, s)
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert got == [list(range(1, n_steps + 1))] * readers
    loop = threading.get_ident()
    assert cond.woken[loop] == board.publisher_wakeups == n_steps  # one per step, however many
    relayed = sum(n for ident, n in cond.woken.items() if ident != loop)
    # Each of the other readers was woken by a reader (plus at most one wake-up per step that
    # reaches a reader who already waits for the next step).
    assert (readers - 1) * n_steps <= relayed <= readers * n_steps


def _raw_unary(channel, method, request_type):
    """A call that returns the reply's bytes as they came over the wire."""
    return channel.unary_unary(f"/{SERVICE_NAME}/{method}",
                               request_serializer=request_type.SerializeToString,
                               response_deserializer=None)


def test_pollers_get_one_reply_per_step_built_once():
    """8 clients polling at once get byte-identical replies, built once per step."""
    board = make_board()
    _publish(board, 1, r=0.5)
    _publish(board, 2, r=1.5)
    server = start_status_server(StatusConfig(), board)
    chans = [grpc.insecure_channel(server.address) for _ in range(8)]
    calls = [_raw_unary(c, "GetMetrics", pb.GetMetricsRequest) for c in chans]

    def poll_all() -> list[bytes]:
        replies = [b""] * len(calls)
        start = threading.Barrier(len(calls))

        def poll(i):
            start.wait()
            replies[i] = calls[i](pb.GetMetricsRequest(window=2), timeout=30)

        threads = [threading.Thread(target=poll, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return replies

    try:
        first = poll_all()
        assert len(set(first)) == 1 and server.stats().metrics_replies_built == 1
        reply = pb.MetricsReply.FromString(first[0])
        assert (reply.latest.step, reply.window, reply.first_step) == (2, 2, 1)
        assert reply.windowed["r"].mean == 1.0 and reply.windowed["r"].count == 2
        _publish(board, 3, r=2.5)
        second = poll_all()
        assert len(set(second)) == 1 and second[0] != first[0]
        assert server.stats().metrics_replies_built == 2  # one more step, one more reply
        assert pb.MetricsReply.FromString(second[0]).windowed["r"].mean == 2.0
    finally:
        for c in chans:
            c.close()
        server.stop(0)


def test_watchers_share_one_message_per_step():
    """6 watchers get byte-identical streams; each step's message is built once, and the
    publishing thread wakes none of them (they wait in the server's process)."""
    board = make_board()
    board._cond = cond = CountingCondition()
    server = start_status_server(StatusConfig(), board)
    n_watchers, n_steps = 6, 12
    chans = [grpc.insecure_channel(server.address) for _ in range(n_watchers)]
    got: list[list[bytes]] = [[] for _ in range(n_watchers)]

    def watch(i):
        stream = chans[i].unary_stream(
            f"/{SERVICE_NAME}/WatchMetrics",
            request_serializer=pb.WatchMetricsRequest.SerializeToString,
            response_deserializer=None)
        got[i].extend(stream(pb.WatchMetricsRequest()))

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(n_watchers)]
    for t in threads:
        t.start()
    _wait_until(lambda: server.stats().open_watchers == n_watchers)
    for s in range(1, n_steps + 1):
        _publish(board, s, r=s / 4)
    _wait_until(lambda: all(len(g) == n_steps for g in got))
    stats = server.stats()
    server.stop(grace=5)  # closes the board: the streams end
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    for c in chans:
        c.close()
    assert all(g == got[0] for g in got)
    assert [pb.StepMetrics.FromString(m).step for m in got[0]] == list(range(1, n_steps + 1))
    assert stats.step_messages_built == n_steps
    assert cond.woken[threading.get_ident()] == 0


# ---------------------------------------------------------------------------------------------
# bench/status_load.py's verdict


@pytest.fixture(scope="module")
def status_load():
    path = Path(__file__).resolve().parents[3] / "bench" / "status_load.py"
    spec = importlib.util.spec_from_file_location("status_load", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_status_load_verdict_from_the_interval(status_load):
    assert status_load.verdict(0.98, 1.04, 1.05) == "PASS"
    assert status_load.verdict(1.06, 1.09, 1.05) == "FAIL"
    assert status_load.verdict(1.01, 1.07, 1.05) == "INCONCLUSIVE"
    rng = random.Random(0)

    def rounds(slowdown, drift):
        out = []
        for r in range(8):  # each round's pair of blocks shares the machine's drift
            level = 1 + drift * r
            out.append(([level * rng.gauss(1, 0.02) for _ in range(15)],
                        [level * slowdown * rng.gauss(1, 0.02) for _ in range(15)]))
        return out

    # The interval holds the true ratio, drift between rounds cancels, and it is reproducible.
    for slowdown in (1.0, 1.2):
        lo, hi = status_load.bootstrap_ratio(rounds(slowdown, 0.05), "median", 2000, 0.95, 0)
        assert lo < slowdown < hi and hi - lo < 0.05, (slowdown, lo, hi)
    data = rounds(1.1, 0.0)
    assert (status_load.bootstrap_ratio(data, "mean", 500, 0.9, 3)
            == status_load.bootstrap_ratio(data, "mean", 500, 0.9, 3))
