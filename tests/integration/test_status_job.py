"""The status service of a real, running (tiny) job, queried with a real gRPC client."""

import math
import os
import subprocess
import sys
import threading

import grpc
import jax
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from controller.api import Job
from controller.cli.status import StatusClient
from controller.config import load_config
from controller.status import status_pb2 as pb
from controller.status.server import SERVICE_NAME

TINY = ["model.hidden_size=16", "model.num_layers=1", "model.mlp_dim=32", "model.num_heads=2",
        "model.num_kv_heads=1", "data.prompts_per_step=4", "sampling.group_size=2",
        "sampling.max_new_tokens=5", "run.progress=false"]
STOP_DURING_STEP = 3  # RequestStop arrives while step 3 is training


def health_of(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status


def test_every_rpc_against_a_running_job():
    job = Job(load_config(overrides=[*TINY, "run.steps=50", "status.port=0"]))
    client = StatusClient(job.status_address)
    try:
        _check_job(job, client)
    finally:
        client.close()
        job.close()


def _check_job(job, client):
    host, port = job.status_address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0  # status.port=0 picked a free port

    # Before the run: the job is built and idle; health is SERVING; reflection works.
    st = client.status()
    assert st.phase == pb.IDLE and st.step == 0 and st.total_steps == 50
    assert st.config_digest == job.config.digest() and st.job_id == job.board.job_id
    assert st.uptime_s > 0 and st.start_time_unix > 1.6e9
    assert health_of(client.channel) == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(client.channel).get_services()
    assert SERVICE_NAME in services and "grpc.health.v1.Health" in services

    topo = client.topology()
    assert [d.id for d in topo.devices] == list(range(8))
    assert list(topo.trainer.device_ids) == [0, 1, 2, 3]
    assert list(topo.sampler.device_ids) == [4, 5, 6, 7]
    assert dict(topo.trainer.axes) == {"fsdp": 4} and dict(topo.sampler.axes) == {"dp": 1,
                                                                                   "tp": 4}
    assert topo.trainer.rules["embed"] == "fsdp" and topo.sampler.rules["mlp"] == "tp"
    assert topo.summary == job.meshes.describe() and topo.backend == "cpu-sim"
    params = {p.path: p for p in topo.params}
    assert len(params) == job.model_def.spec.num_layers * 9 + 2  # 9 per layer + embed, norm
    gate = params["layers/0/mlp/gate_proj"]  # (embed, mlp): fsdp on trainer, tp on sampler
    assert (list(gate.shape), gate.dtype) == ([16, 32], "float32")
    assert gate.trainer_spec == "P('fsdp', None)" and gate.sampler_spec == "P(None, 'tp')"

    # No checkpoint hook yet: a clear FAILED_PRECONDITION.
    with pytest.raises(grpc.RpcError) as e:
        client.request_checkpoint()
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "checkpointing is not configured" in e.value.details()
    saved = []
    job.set_checkpoint_hook(lambda step: saved.append((step, job.board.snapshot.phase.value)))

    # Watchers subscribed before the run see every step, live.
    watchers = [StatusClient(job.status_address) for _ in range(3)]
    seen = [[] for _ in watchers]
    threads = [threading.Thread(target=lambda i=i: seen[i].extend(
        (m.step, dict(m.values)) for m in watchers[i].watch())) for i in range(len(watchers))]
    for t in threads:
        t.start()
    while job.status_server.stats().open_watchers < len(watchers):
        threading.Event().wait(0.01)

    # The loop thread itself asks (over gRPC) for a checkpoint during step 1 and a stop while
    # step 3 is training: both must name the step they take effect after.
    replies, phases = {}, []

    publish = job.timeline.on_span_start  # the Job's own hook: span start -> board phase

    def on_span_start(span, mesh, step_of_span):
        publish(span, mesh, step_of_span)
        if span not in ("sample", "score", "update", "reshard"):
            return
        name = job.board.snapshot.phase.value
        step = job.steps_done + 1
        phases.append((step, name))
        if step == 1 and name == "scoring":
            replies["ckpt"] = client.request_checkpoint()
            replies["health"] = health_of(client.channel)
            replies["status"] = client.status()
        if step == STOP_DURING_STEP and name == "training":
            replies["stop"] = client.request_stop("test stop")

    job.timeline.on_span_start = on_span_start
    runner = threading.Thread(target=job.run)
    runner.start()
    runner.join(600)  # generous: a loaded CI box compiles slowly; nothing here is timed
    assert not runner.is_alive()

    assert replies["ckpt"].accepted and replies["ckpt"].after_step == 1
    assert replies["health"] == health_pb2.HealthCheckResponse.SERVING
    assert replies["status"].phase == pb.SCORING and replies["status"].step == 0
    assert replies["stop"].accepted and replies["stop"].after_step == STOP_DURING_STEP
    # The stop finished step 3 completely (all its phases, finite metrics), took no step 4,
    # and saved a checkpoint of step 3; the requested one of step 1 came before step 2.
    assert job.steps_done == STOP_DURING_STEP
    assert [n for s, n in phases if s == STOP_DURING_STEP] == [
        "sampling", "scoring", "training", "syncing"]
    assert math.isfinite(job.metrics[-1]["loss/total"])
    assert saved == [(1, "checkpointing"), (STOP_DURING_STEP, "checkpointing")]

    # After the stop: STOPPED, health NOT_SERVING, the server still answers until close().
    st = client.status()
    assert st.phase == pb.STOPPED and st.phase_name == "stopped"
    assert st.step == STOP_DURING_STEP and st.policy_version == STOP_DURING_STEP
    assert st.stop_requested and st.checkpointing_configured and st.last_error == ""
    assert health_of(client.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not client.request_stop().accepted

    mr = client.metrics(window=2)
    assert mr.latest.step == 3 and mr.window == 2 and mr.first_step == 2
    r = [m["reward/mean"] for m in job.metrics]
    assert mr.latest.values["reward/mean"] == pytest.approx(r[2], abs=1e-12)
    assert mr.windowed["reward/mean"].mean == pytest.approx((r[1] + r[2]) / 2, abs=1e-12)
    assert mr.windowed["reward/mean"].count == 2
    assert mr.latest.values["throughput/tokens_per_s"] > 0
    assert client.metrics(window=0).window == 3  # 0 means the default 10: all 3 here

    late = StatusClient(job.status_address)
    late_stream = late.watch(from_step=2)  # replays 2, 3, then ends at close()
    late_seen = []
    late_thread = threading.Thread(target=lambda: late_seen.extend(m.step for m in late_stream))
    late_thread.start()
    while job.status_server.stats().open_watchers < len(watchers) + 1:
        threading.Event().wait(0.01)  # the late stream is open on the server

    job.close()  # stops the server: open streams drain and end
    for t in [*threads, late_thread]:
        t.join(10)
        assert not t.is_alive()
    for s in seen:
        assert [step for step, _ in s] == [1, 2, 3]
        assert [v["reward/mean"] for _, v in s] == r
    assert late_seen == [2, 3]
    trailer = dict(late_stream.trailing_metadata())
    assert trailer["tandem-phase"] == "stopped" and trailer["tandem-last-error"] == ""
    assert trailer["tandem-step"] == trailer["tandem-policy-version"] == "3"
    with pytest.raises(grpc.RpcError) as e:
        client.status()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    for w in [*watchers, late]:
        w.close()


def test_job_refuses_open_bind_without_token():
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_STATUS_TOKEN"}
    out = subprocess.run(
        [sys.executable, "-m", "controller.cli", "run", "status.host=0.0.0.0", "run.steps=1"],
        capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "status.host='0.0.0.0' is not a loopback address" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_watch_view_ends_with_the_job(capsys, monkeypatch):
    """`tandem status --watch` (not a terminal: a log, then the final table) replays the last
    --window steps, follows the run, and reports how the job ended."""
    from controller.cli import main

    monkeypatch.setenv("COLUMNS", "120")
    job = Job(load_config(overrides=[*TINY, "run.steps=3"]))
    try:
        job.step()
        rc = []
        watch = threading.Thread(target=lambda: rc.append(
            main(["status", "--address", job.status_address, "--watch", "--window", "5"])))
        watch.start()
        while job.status_server.stats().open_watchers < 1:
            threading.Event().wait(0.01)
        job.run()
        seen = ""
        for _ in range(6000):  # the view has printed step 3 (it runs on its own thread)
            seen += capsys.readouterr().out
            if "step     3" in seen:
                break
            threading.Event().wait(0.01)
        assert main(["status", "--address", job.status_address]) == 0  # one-shot table
        table = capsys.readouterr().out
    finally:
        job.close()
    watch.join(60)
    out = seen + capsys.readouterr().out
    assert rc == [0], out
    assert "| stopped | step 3/3 |" in table and "reward/mean" in table
    assert "devices: trainer: 4 devices [0, 1, 2, 3]" in table
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("step  ")] == [
        "1", "2", "3"]  # step 1 replayed, 2 and 3 live
    assert "| stopped | step 3/3 |" in out and "step 3 | last 3 steps from step 1" in out
    assert out.rstrip().endswith("the job's stream has ended: the job stopped after step 3")


def test_watchers_of_a_running_job_share_each_step():
    """Several watchers of a real job get byte-identical streams. Each step's message is built
    once, and the thread that runs the steps wakes none of them (they wait in the server's
    process)."""
    job = Job(load_config(overrides=[*TINY, "run.steps=4", "status.port=0"]))
    n_watchers = 4
    chans = [grpc.insecure_channel(job.status_address) for _ in range(n_watchers)]
    got: list[list[bytes]] = [[] for _ in range(n_watchers)]

    def watch(i):
        stream = chans[i].unary_stream(
            f"/{SERVICE_NAME}/WatchMetrics",
            request_serializer=pb.WatchMetricsRequest.SerializeToString,
            response_deserializer=None)  # the bytes as they came over the wire
        got[i].extend(stream(pb.WatchMetricsRequest()))

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(n_watchers)]
    try:
        for t in threads:
            t.start()
        while job.status_server.stats().open_watchers < n_watchers:
            threading.Event().wait(0.01)
        job.run()
        assert job.board.publisher_wakeups == 0  # the watchers wait in the server's process
        assert job.steps_done == 4
        for _ in range(3000):  # every stream has had every step
            if all(len(g) == 4 for g in got):
                break
            threading.Event().wait(0.01)
        stats = job.status_server.stats()
    finally:
        job.close()  # stops the server: the streams drain and end
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    for c in chans:
        c.close()
    assert all(g == got[0] for g in got)
    steps = [pb.StepMetrics.FromString(m) for m in got[0]]
    assert [m.step for m in steps] == [1, 2, 3, 4]
    assert [m.values["reward/mean"] for m in steps] == [m["reward/mean"] for m in job.metrics]
    assert stats.step_messages_built == 4


def test_a_lora_job_serves_its_adapter_sync_and_adapters():
    # With LoRA, what a client sees of the weight sync is the adapters' bytes (the base moved
    # once, before step 1), and the topology lists the adapters with the params they train.
    from trainer import lora

    job = Job(load_config(overrides=[*TINY, "run.steps=3", "status.port=0",
                                     "model.lora={rank: 4, targets: [q, down]}",
                                     "eval.enabled=false"]))
    client = StatusClient(job.status_address)
    try:
        job.run()
        adapter_bytes = lora.adapter_bytes(job.trainer.params)
        full_bytes = sum(x.nbytes for x in jax.tree.leaves(job.trainer.base)) + adapter_bytes
        latest = client.metrics(window=3)
        assert latest.latest.step == 3
        assert latest.latest.values["reshard/bytes"] == adapter_bytes < full_bytes / 4
        assert latest.windowed["reshard/bytes"].max == adapter_bytes
        params = {p.path: p for p in client.topology().params}
        assert len(params) == 9 + 2 + 4  # the base's, and A and B of q and down
        b = params["layers/0/mlp/down_lora_b"]  # [rank, embed]
        assert list(b.shape) == [4, 16] and b.trainer_spec == "P(None, 'fsdp')"
    finally:
        client.close()
        job.close()
