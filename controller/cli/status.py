"""`tandem status`: ask a running job how it is doing, over gRPC (controller/status.proto).

    tandem status --address 127.0.0.1:50051            # status, metrics and devices, once
    tandem status --address 127.0.0.1:50051 --watch    # follow every step as it completes
    tandem status --json                               # the same as JSON (JSON lines with --watch)

The status line is followed by the latest held-out evaluation, once the job has run one
(`--all` shows its every key; `--json` has them all under status.latest_eval).

The address defaults to the env var TANDEM_STATUS_ADDRESS; the bearer token to
TANDEM_STATUS_TOKEN (the job's `status.token_env`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from controller.cli.args import fail

ADDRESS_ENV = "TANDEM_STATUS_ADDRESS"
TOKEN_ENV = "TANDEM_STATUS_TOKEN"
# Metrics shown in the table, in this order (others follow alphabetically with --all).
KEY_METRICS = (
    "reward/mean", "reward/std", "loss/total", "loss/policy", "kl/mean", "grad/norm",
    "completion/len_mean", "time/step_s", "time/sample_s", "time/reward_s", "time/update_s",
    "time/reshard_s", "throughput/tokens_per_s", "reshard/bytes", "reshard/gbps",
    "sampler/logp_abs_diff",
)
# The evaluation line's headline: accuracy, then pass@k, maj@k and mean@k (each by k), then
# the mean reward. Per-dataset and other eval keys are shown with --all (and are in --json).
_EVAL_AT_K = re.compile(r"eval/(pass|maj|mean)@(\d+)")
_EVAL_AT_K_ORDER = ("pass", "maj", "mean")


class StatusClient:
    """A channel, the TandemStatus stub, and the metadata every call carries."""

    def __init__(self, address: str, token: str | None = None, ca_cert: str | None = None,
                 timeout: float = 10.0):
        import grpc

        from controller.status import status_pb2 as pb
        from controller.status import status_pb2_grpc as pb_grpc

        self.pb = pb
        self.address = address
        self.timeout = timeout
        if ca_cert is not None:
            with open(ca_cert, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            self.channel = grpc.secure_channel(address, creds)
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.TandemStatusStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def status(self) -> Any:
        return self.stub.GetStatus(self.pb.GetStatusRequest(), timeout=self.timeout,
                                   metadata=self.metadata)

    def metrics(self, window: int = 10) -> Any:
        return self.stub.GetMetrics(self.pb.GetMetricsRequest(window=window),
                                    timeout=self.timeout, metadata=self.metadata)

    def topology(self) -> Any:
        return self.stub.GetTopology(self.pb.GetTopologyRequest(), timeout=self.timeout,
                                     metadata=self.metadata)

    def watch(self, from_step: int = 0) -> Any:
        """An iterator of StepMetrics (no deadline: it lasts as long as the job)."""
        return self.stub.WatchMetrics(self.pb.WatchMetricsRequest(from_step=from_step),
                                      metadata=self.metadata)

    def request_stop(self, reason: str = "") -> Any:
        return self.stub.RequestStop(self.pb.RequestStopRequest(reason=reason),
                                     timeout=self.timeout, metadata=self.metadata)

    def request_checkpoint(self) -> Any:
        return self.stub.RequestCheckpoint(self.pb.RequestCheckpointRequest(),
                                           timeout=self.timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()


def to_dict(msg: Any) -> dict[str, Any]:
    """A message as plain JSON data: enums by name, int64 as numbers (not proto3-JSON
    strings), every field present."""
    from google.protobuf.descriptor import FieldDescriptor as F

    def value(fd: Any, v: Any) -> Any:
        if fd.type == F.TYPE_MESSAGE:
            return to_dict(v)
        if fd.type == F.TYPE_ENUM:
            return fd.enum_type.values_by_number[v].name
        return v

    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        v = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            vfd = fd.message_type.fields_by_name["value"]
            out[fd.name] = {k: value(vfd, v[k]) for k in sorted(v)}
        elif fd.is_repeated:
            out[fd.name] = [value(fd, x) for x in v]
        elif fd.type == F.TYPE_MESSAGE and not msg.HasField(fd.name):
            out[fd.name] = None
        else:
            out[fd.name] = value(fd, v)
    return out


def _fmt(v: float) -> str:
    if v != v:  # NaN
        return "nan"
    a = abs(v)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else (
        f"{s // 60}m{s % 60:02d}s")


def status_line(st: Any) -> str:
    err = f" | last error: {st.last_error}" if st.last_error else ""
    stop = " | stop requested" if st.stop_requested else ""
    return (f"job {st.job_id} (config {st.config_digest}) | {st.phase_name} | step "
            f"{st.step}/{st.total_steps} | policy v{st.policy_version} | up "
            f"{_duration(st.uptime_s)}{stop}{err}")


def eval_line(step: int, values: Mapping[str, float], show_all: bool = False) -> str:
    """One line for an evaluation: its headline keys that are present, in a fixed order.

    For example `eval (step 50): accuracy 0.312  pass@4 0.500  maj@4 0.375  mean@4 0.290
    reward 0.290  (64 prompts, 1.8 s)`. Reward failures are noted when there were any; with
    `show_all`, every other key follows the headline, sorted.
    """
    def num(v: float) -> str:
        return "nan" if v != v else f"{v:.3f}"

    shown = {"eval/accuracy", "eval/reward/mean", "eval/prompts", "eval/time_s",
             "eval/rewards/failures"}
    parts = [f"accuracy {num(values['eval/accuracy'])}"] if "eval/accuracy" in values else []
    at_k = sorted((_EVAL_AT_K_ORDER.index(m[1]), int(m[2]), k)
                  for k in values if (m := _EVAL_AT_K.fullmatch(k)))
    parts += [f"{k.removeprefix('eval/')} {num(values[k])}" for _, _, k in at_k]
    shown.update(k for _, _, k in at_k)
    if "eval/reward/mean" in values:
        parts.append(f"reward {num(values['eval/reward/mean'])}")
    if show_all:
        parts += [f"{k.removeprefix('eval/')} {_fmt(values[k])}"
                  for k in sorted(values) if k not in shown]
    notes = []
    prompts = values.get("eval/prompts", math.nan)
    if math.isfinite(prompts):
        notes.append(f"{int(prompts)} prompts")
    if math.isfinite(values.get("eval/time_s", math.nan)):
        notes.append(f"{values['eval/time_s']:.1f} s")
    failures = values.get("eval/rewards/failures", 0.0)
    if failures > 0 and math.isfinite(failures):  # a failed reward is reported, not hidden
        notes.append(f"{int(failures)} reward failures")
    line = f"eval (step {step}): " + "  ".join(parts)
    if notes:
        line += ("  " if parts else "") + f"({', '.join(notes)})"
    return line


def status_eval_line(st: Any, show_all: bool = False) -> str | None:
    """eval_line of a StatusReply's latest evaluation; None before the first."""
    if not st.HasField("latest_eval"):
        return None
    return eval_line(st.latest_eval.step, st.latest_eval.values, show_all)


def metrics_table(latest: dict[str, float], latest_step: int, first_step: int, n: int,
                  stats: Any, show_all: bool = False) -> Any:
    """The latest value and window statistics of each metric, key metrics first.

    `stats` maps key -> an object with mean/std/min/max (pb.MetricStats or the board's).
    """
    from rich.table import Table

    table = Table(title=(f"step {latest_step} | last {n} steps from step {first_step}"
                         if latest else "no step has completed yet"), title_justify="left")
    for col in ("metric", "latest", "mean", "std", "min", "max"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    keys = [k for k in KEY_METRICS if k in latest]
    keys += sorted(k for k in latest if k not in KEY_METRICS and k != "step"
                   and (show_all or k.startswith(("reward/", "staleness/", "rewards/"))))
    for k in keys:
        w = stats.get(k)
        table.add_row(k, _fmt(latest[k]), *((_fmt(w.mean), _fmt(w.std), _fmt(w.min),
                                            _fmt(w.max)) if w else ("",) * 4))
    return table


def reply_table(mr: Any, show_all: bool = False) -> Any:
    """metrics_table of a GetMetrics reply."""
    latest = dict(mr.latest.values) if mr.HasField("latest") else {}
    return metrics_table(latest, mr.latest.step, mr.first_step, mr.window, mr.windowed,
                         show_all)


def _error(msg: str) -> int:
    return fail(msg, code=1)  # a query that failed, not a usage error


def _rpc_error(e: Any, address: str) -> int:
    import grpc

    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return _error(f"no status server answers at {address} ({e.details()}) (fix: is the job "
                      f"running? pass the address `tandem run` printed: --address HOST:PORT)")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return _error(f"{address} refused the call: {e.details()} (fix: --token TOKEN or the "
                      f"env var {TOKEN_ENV})")
    return _error(f"{address}: {code.name}: {e.details()}")


def _watch(client: StatusClient, ns: argparse.Namespace) -> int:
    """Follows WatchMetrics; a live table on a terminal, one line per step otherwise.

    The table is computed here from the streamed steps (the stream first replays the last
    `--window` steps), so the final frame is complete even though the job's server goes away
    right after its last step.
    """
    import grpc
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    from controller.status.board import window_stats

    console = Console()
    st = client.status()
    from_step = ns.from_step or max(1, st.step - ns.window + 1)
    stream = client.watch(from_step=from_step)
    if ns.json:
        for m in stream:  # JSON lines, one per step, flushed as they come
            print(json.dumps({**dict(m.values), "step": m.step, "time_unix": m.time_unix}),
                  flush=True)
        return 0
    recent: deque[Any] = deque(maxlen=ns.window)
    state: dict[str, Any] = {"status": st, "done": False, "error": None}

    def follow() -> None:
        try:
            for m in stream:
                recent.append(m)
                if not console.is_terminal:
                    v = m.values
                    console.print(
                        f"step {m.step:>5}  reward {v.get('reward/mean', float('nan')):.3f}  "
                        f"loss {v.get('loss/total', float('nan')):+.4f}  "
                        f"kl {v.get('kl/mean', float('nan')):.4f}  "
                        f"{v.get('time/step_s', float('nan')):.3f}s/step  "
                        f"{v.get('throughput/tokens_per_s', float('nan')):,.0f} tok/s",
                        highlight=False)
        except Exception as e:
            state["error"] = e
        finally:
            state["done"] = True

    def new_eval_line() -> str | None:
        # A log prints each evaluation once, when a status poll first shows it.
        st = state["status"]
        if not st.HasField("latest_eval"):
            return None
        key = (st.latest_eval.step, st.latest_eval.time_unix)
        if key == state["eval_shown"]:
            return None
        state["eval_shown"] = key
        return status_eval_line(st, ns.all)

    state["eval_shown"] = None
    t = threading.Thread(target=follow, daemon=True)
    if not console.is_terminal:  # a log, not a live view: say whom we follow first
        console.print(status_line(st), highlight=False)
        if (line := new_eval_line()) is not None:
            console.print(line, highlight=False)
    t.start()

    def header() -> list[Any]:
        line = status_eval_line(state["status"], ns.all)
        return [Text(status_line(state["status"]))] + ([Text(line)] if line else [])

    def render() -> Any:
        rows = list(recent)
        if not rows:
            return Group(*header(), metrics_table({}, 0, 0, 0, {}, ns.all))
        stats = window_stats([_Rec(m.values) for m in rows])
        table = metrics_table(dict(rows[-1].values), rows[-1].step, rows[0].step, len(rows),
                              stats, ns.all)
        return Group(*header(), table)

    last_status = 0.0
    with Live(render(), console=console, refresh_per_second=4, transient=False,
              auto_refresh=console.is_terminal) as live:
        while not state["done"]:
            time.sleep(0.25)
            if time.monotonic() - last_status > 1.0:
                with contextlib.suppress(grpc.RpcError):  # the job may be ending
                    state["status"] = client.status()
                last_status = time.monotonic()
                if not console.is_terminal and (line := new_eval_line()) is not None:
                    console.print(line, highlight=False)
            if console.is_terminal:
                live.update(render())
        t.join()
        if state["error"] is None:
            # The stream ended because the job did: show it stopped at its last step.
            with contextlib.suppress(grpc.RpcError):
                state["status"] = client.status()
            final = type(state["status"])()
            final.CopyFrom(state["status"])
            # The server names the job's final phase in the stream's trailing metadata.
            trailer = dict(stream.trailing_metadata() or ())
            final.phase_name = trailer.get("tandem-phase", "ended")
            final.last_error = trailer.get("tandem-last-error", final.last_error)
            final.step = int(trailer.get("tandem-step", final.step))
            final.policy_version = int(trailer.get("tandem-policy-version",
                                                   final.policy_version))
            final.uptime_s = time.time() - final.start_time_unix
            state["status"] = final
        live.update(render())
    err = state["error"]
    if isinstance(err, grpc.RpcError):
        return 0 if err.code() == grpc.StatusCode.CANCELLED else _rpc_error(err, client.address)
    if err is not None:
        raise err
    console.print()
    console.print(f"the job's stream has ended: the job stopped after step "
                  f"{recent[-1].step if recent else state['status'].step}", highlight=False)
    return 0


class _Rec:
    """A streamed step in the shape window_stats reads."""

    def __init__(self, values: Any):
        self.values = dict(values)


def cmd_status(ns: argparse.Namespace) -> int:
    address = ns.address or os.environ.get(ADDRESS_ENV)
    if not address:
        return _error(f"no address (fix: --address HOST:PORT, as `tandem run` printed it, or "
                      f"the env var {ADDRESS_ENV})")
    token = ns.token or os.environ.get(TOKEN_ENV)
    import grpc

    client = StatusClient(address, token, ns.ca_cert, timeout=ns.timeout)
    try:
        if ns.watch:
            try:
                return _watch(client, ns)
            except KeyboardInterrupt:
                return 130
        st, mr = client.status(), client.metrics(ns.window)
        topo = None
        try:
            topo = client.topology()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:  # UNAVAILABLE: still starting
                raise
        if ns.json:
            out = {"status": to_dict(st), "metrics": to_dict(mr)}
            if topo is not None:
                out["topology"] = to_dict(topo)
            print(json.dumps(out, indent=2))
            return 0
        from rich.console import Console

        console = Console()
        console.print(status_line(st), highlight=False)
        if (line := status_eval_line(st, ns.all)) is not None:
            console.print(line, highlight=False)
        if topo is not None:
            console.print(f"devices: {topo.summary}", highlight=False)
        console.print(reply_table(mr, ns.all))
        return 0
    except grpc.RpcError as e:
        return _rpc_error(e, address)
    finally:
        client.close()


def add_status_parser(sub: Any) -> None:
    """Registers `tandem status` on the CLI's subparsers."""
    p = sub.add_parser(
        "status", help="ask a running job for its status and metrics (gRPC)",
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help=f"host:port of the job's status server (env {ADDRESS_ENV})")
    p.add_argument("--token", help=f"bearer token (env {TOKEN_ENV})")
    p.add_argument("--ca-cert", help="PEM CA certificate; connects with TLS when given")
    p.add_argument("--watch", action="store_true",
                   help="follow every step as it completes (live table; JSON lines with --json)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--window", type=int, default=10, help="steps to summarize (default 10)")
    p.add_argument("--from-step", type=int, default=0,
                   help="with --watch: replay retained steps from this one first")
    p.add_argument("--all", action="store_true", help="show every metric key")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    p.set_defaults(func=cmd_status)
