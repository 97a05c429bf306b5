"""Paths a user gives, local or gs://, against a GCS emulator on loopback."""

import json
import os
import socket
import struct
import urllib.request
from pathlib import Path

import pytest
from helpers.gcs_emulator import BUCKET

from controller.config import absolute_path, as_path, load_config
from controller.metrics import MetricsLog
from controller.storage import STAGING_ENV, append_text, stage, staged_inputs, upload_dir

pytestmark = pytest.mark.timeout(180)  # a stalled emulator fails these, not the whole run


def test_the_emulator_answers_after_printing_more_than_a_pipe_holds(gcs):
    """Clients that drop connections (as gcsfs and tensorstore do) make the emulator print a
    traceback each; more than a pipe's 64 KiB of them must not stall it."""
    host, port = gcs.url.removeprefix("http://").rsplit(":", 1)
    start = gcs.log.stat().st_size
    for _ in range(200):
        if gcs.log.stat().st_size - start > 80 * 1024:
            break
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            s.sendall(f"GET /storage/v1/b/{BUCKET}/o HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert gcs.log.stat().st_size - start > 64 * 1024
    with urllib.request.urlopen(f"{gcs.url}/storage/v1/b/{BUCKET}", timeout=10) as answer:
        assert json.load(answer)["name"] == BUCKET


def test_gs_paths_stay_urls_through_config_and_joins(monkeypatch, tmp_path):
    cfg = load_config(overrides=[f"run.output_dir=gs://{BUCKET}/run"])
    assert cfg.run.output_dir == f"gs://{BUCKET}/run"
    assert cfg.checkpoint_dir == f"gs://{BUCKET}/run/checkpoints"  # not "gs:/tandem-test/..."
    assert str(as_path(cfg.run.output_dir) / "metrics.jsonl") == f"gs://{BUCKET}/run/metrics.jsonl"
    monkeypatch.chdir(tmp_path)
    assert str(as_path("runs/x") / "y") == "runs/x/y"  # as the user wrote it, for messages
    assert str(as_path(absolute_path("runs/x")) / "y") == str(tmp_path / "runs/x/y")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert str(as_path("~/runs") / "y") == str(tmp_path / "home/runs/y")


def test_stage_copies_a_remote_directory_once_and_again_when_it_changes(gcs, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staged"))
    src = as_path(f"gs://{BUCKET}/models/m1")
    (src / "config.json").write_text('{"model_type": "qwen2"}')
    (src / "model.safetensors").write_bytes(b"\x00" * 1000)
    (src / "sub" / "ignored.txt").write_text("x")  # subdirectories are not staged
    local = stage(str(src), "model.path", quiet=True)
    assert local.parent.parent == tmp_path / "staged"
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == [
        "config.json", "model.safetensors"]
    assert (local / "config.json").read_text() == '{"model_type": "qwen2"}'
    os.utime(local / "config.json", (0, 0))
    before = (local / "config.json").stat().st_mtime
    assert stage(str(src), "model.path", quiet=True) == local  # unchanged: nothing copied
    assert (local / "config.json").stat().st_mtime == before
    (src / "config.json").write_text('{"model_type": "llama"}')  # changed remotely
    stage(str(src), "model.path", quiet=True)
    assert (local / "config.json").read_text() == '{"model_type": "llama"}'


def test_stage_of_a_missing_url_names_the_field(gcs, tmp_path, monkeypatch):
    from controller.config import ConfigError

    monkeypatch.setenv(STAGING_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match=r"data.path='gs://tandem-test/nope.jsonl' does not "
                                          r"exist \(fix: check the URL"):
        stage(f"gs://{BUCKET}/nope.jsonl", "data.path")


def test_staged_inputs_swaps_only_remote_paths(gcs, tmp_path, monkeypatch):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staged"))
    (as_path(f"gs://{BUCKET}/data/p.jsonl")).write_text('{"prompt": "1+1", "target": "2"}\n')
    cfg = load_config(overrides=["data.task=jsonl", f"data.path=gs://{BUCKET}/data/p.jsonl",
                                 "rewards.functions=[gsm8k]"])
    local = staged_inputs(cfg)
    assert cfg.data.path == f"gs://{BUCKET}/data/p.jsonl"  # the config is left as written
    assert Path(local.data.path).read_text() == '{"prompt": "1+1", "target": "2"}\n'
    plain = load_config()
    assert staged_inputs(plain) is plain


def test_append_and_upload_to_a_bucket(gcs, tmp_path):
    log = as_path(f"gs://{BUCKET}/append/error.log")
    append_text(log, "one\n")
    append_text(log, "two\n")
    assert log.read_text() == "one\ntwo\n"
    (tmp_path / "hf" / "sub").mkdir(parents=True)
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "sub" / "w.bin").write_bytes(b"\x01\x02")
    upload_dir(tmp_path / "hf", as_path(f"gs://{BUCKET}/up"))
    assert as_path(f"gs://{BUCKET}/up/config.json").read_text() == "{}"
    assert as_path(f"gs://{BUCKET}/up/sub/w.bin").read_bytes() == b"\x01\x02"


def test_metrics_in_a_bucket_are_uploaded_on_flush_and_trimmed_on_resume(gcs):
    out = f"gs://{BUCKET}/metrics-run"
    file = as_path(out) / "metrics.jsonl"
    log = MetricsLog(out)
    for step in (1, 2, 3):
        log.append({"step": step, "reward/mean": step / 10})
    log.flush()
    assert [json.loads(x)["step"] for x in file.read_text().splitlines()] == [1, 2, 3]
    log.append({"step": 4, "reward/mean": 0.4})
    log.close()
    assert [json.loads(x)["step"] for x in file.read_text().splitlines()] == [1, 2, 3, 4]
    resumed = MetricsLog(out, resume_step=2)  # steps 3-4 will run again
    assert [m["step"] for m in resumed.history] == [1, 2]
    assert [json.loads(x)["step"] for x in file.read_text().splitlines()] == [1, 2]
    resumed.append({"step": 3, "reward/mean": 0.3})
    resumed.close()
    assert [json.loads(x)["step"] for x in file.read_text().splitlines()] == [1, 2, 3]


def test_tensorboard_events_with_rollout_text_locally_and_in_a_bucket(gcs, tmp_path):
    from controller.metrics import TensorBoardSink

    def run(out: str) -> bytes:
        log = MetricsLog(out, sinks=[TensorBoardSink(as_path(out) / "tensorboard")])
        log.append({"step": 1, "reward/mean": 0.25})
        log.write_records("samples.jsonl", [{"step": 1, "prompt": "12=", "completion": "21."}])
        log.close()
        files = list((as_path(out) / "tensorboard").iterdir())
        assert len(files) == 1 and files[0].name.startswith("events.out.tfevents")
        return files[0].read_bytes()

    local = run(str(tmp_path / "run"))
    remote = run(f"gs://{BUCKET}/tb-run")  # written locally, uploaded on close
    for events in (local, remote):
        assert b"reward/mean" in events and b"samples/0" in events and b"21." in events
    assert json.loads((tmp_path / "run" / "samples.jsonl").read_text())["completion"] == "21."
