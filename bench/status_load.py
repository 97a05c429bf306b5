"""Does a busy status service slow training? 50 pollers + 10 watchers vs no clients.

    python bench/status_load.py                      # the default job, 8 ABBA rounds
    python bench/status_load.py --rounds 4 --block 10 run.steps=1000 model.hidden_size=128

One job runs its steps in blocks. In a *baseline* block no client is connected; in a *loaded*
block a separate client process (as real monitoring clients would be: another process, another
machine) opens 50 channels that each poll GetMetrics every `--poll-interval` seconds (default
1 s, the pollers' phases spread evenly over the interval, as independent dashboards would be)
and 10 channels that each follow WatchMetrics. Blocks alternate A B B A ... so that drift in the
machine's load hits both conditions alike. Each step is timed around `job.step()` (so the
snapshot publishing is inside the measurement), and the controller process's CPU time per step
is reported beside it (on a shared machine the client process competes for the same cores, so
wall time also shows the clients' own cost). On Linux the CPU of the status server's process
(a child of the controller, where gRPC's I/O threads, its poller and its handlers run) is
reported too: what the clients cost the machine, none of which is the controller's own CPU.

The verdict compares the ratio of the median step time loaded / baseline with `--max-ratio`
(default 1.05) through a bootstrap confidence interval: the unit resampled is a *round*, two
adjacent blocks (one of each condition), and the steps within each drawn block are resampled
too, so the interval covers both the drift between rounds and the noise between steps. PASS if
the whole interval is <= the target, FAIL if it is all above, INCONCLUSIVE if it straddles the
target (rerun on a quieter machine, or with more --rounds). It also checks that every watcher
of every loaded block saw every step of its block exactly once, in order.

Exit status: 0 PASS, 1 FAIL or a watcher missed, duplicated or reordered a step,
3 INCONCLUSIVE.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy

EXIT_INCONCLUSIVE = 3


# ---------------------------------------------------------------------------------------------
# The client process: `status_load.py --client ADDRESS`, driven by JSON lines on stdin.


def client_main(address: str, pollers: int, watchers: int, interval: float) -> int:
    import grpc

    from controller.status import status_pb2 as pb
    from controller.status import status_pb2_grpc as pb_grpc

    def channel():
        # A subchannel pool per channel: each client has its own TCP connection.
        return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            return 0
        block = client_block(channel, pb, pb_grpc, pollers, watchers, interval, cmd["first"],
                             cmd["last"])
        print(json.dumps({"op": "done", **block}), flush=True)
    return 0


def client_block(channel, pb, pb_grpc, pollers: int, watchers: int, interval: float,
                 first: int, last: int) -> dict:
    """One loaded block: connect, say "ready", load the server until "stop", report."""
    import grpc

    stop = threading.Event()
    ready = threading.Barrier(pollers + watchers + 1)
    polls = [0] * pollers  # answered between "ready" and "stop" (the connecting call is not)
    errors: list[str] = []
    seen: list[list[int]] = [[] for _ in range(watchers)]
    chans = [channel() for _ in range(pollers + watchers)]

    def poll(i: int) -> None:
        stub = pb_grpc.TandemStatusStub(chans[i])
        try:
            stub.GetMetrics(pb.GetMetricsRequest(window=10), timeout=30)  # connects
        finally:
            ready.wait()
        # Independent clients are not in step: poller i polls at phase i/pollers of the
        # interval, so the server sees a steady pollers/interval calls per second.
        if stop.wait(interval * i / pollers):
            return
        while not stop.is_set():
            try:
                stub.GetMetrics(pb.GetMetricsRequest(window=10), timeout=30)
                polls[i] += 1
            except grpc.RpcError as e:
                errors.append(f"poller {i}: {e.code().name}")
            stop.wait(interval)

    def watch(i: int) -> None:
        stub = pb_grpc.TandemStatusStub(chans[pollers + i])
        stream = stub.WatchMetrics(pb.WatchMetricsRequest(from_step=first))
        ready.wait()
        try:
            for m in stream:
                seen[i].append(m.step)
                if m.step >= last:
                    stream.cancel()
                    break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                errors.append(f"watcher {i}: {e.code().name}")

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(pollers)]
    threads += [threading.Thread(target=watch, args=(i,)) for i in range(watchers)]
    for t in threads:
        t.start()
    ready.wait()  # every poller has been answered once; every stream is open
    print(json.dumps({"op": "ready"}), flush=True)
    json.loads(sys.stdin.readline())  # "stop"
    stop.set()
    for t in threads:
        t.join(120)
    for c in chans:
        c.close()
    return {"polls": sum(polls), "seen": seen, "errors": errors}


# ---------------------------------------------------------------------------------------------
# Statistics


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bootstrap_ratio(rounds: list[tuple[list[float], list[float]]], stat: str, resamples: int,
                    confidence: float, seed: int) -> tuple[float, float]:
    """A percentile interval for stat(loaded) / stat(baseline), stat "median" or "mean".

    `rounds` holds (baseline steps, loaded steps) of adjacent blocks. Each resample draws
    len(rounds) rounds with replacement, then each drawn block's steps with replacement (a
    two-stage bootstrap: drift between rounds and noise between steps both enter).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    base = np.array([b for b, _ in rounds])  # rounds x steps per block
    load = np.array([x for _, x in rounds])
    n_rounds, n_steps = base.shape
    pick = rng.integers(0, n_rounds, size=(resamples, n_rounds))[:, :, None]
    reduce = np.median if stat == "median" else np.mean
    drawn = []
    for blocks in (base, load):
        steps = rng.integers(0, n_steps, size=(resamples, n_rounds, n_steps))
        drawn.append(reduce(blocks[pick, steps].reshape(resamples, -1), axis=1))
    ratios = drawn[1] / drawn[0]
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(ratios, [tail, 1 - tail])
    return float(lo), float(hi)


def verdict(lo: float, hi: float, target: float) -> str:
    if hi <= target:
        return "PASS"
    if lo > target:
        return "FAIL"
    return "INCONCLUSIVE"


# ---------------------------------------------------------------------------------------------
# CPU of a process (Linux): the status server's is what the clients cost the machine.


def process_cpu(pid: int) -> float | None:
    """CPU seconds used so far by process `pid` (all its threads); None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# The controller process


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    ap.add_argument("--rounds", type=int, default=8, help="ABBA rounds (2 blocks each)")
    ap.add_argument("--block", type=int, default=15, help="steps per block")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    ap.add_argument("--pollers", type=int, default=50)
    ap.add_argument("--watchers", type=int, default=10)
    # 1 s: a dashboard or `watch -n1` refreshing every client once a second (50 RPC/s in all).
    ap.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls")
    ap.add_argument("--max-ratio", type=float, default=1.05)
    ap.add_argument("--confidence", type=float, default=0.95, help="of the interval")
    ap.add_argument("--resamples", type=int, default=4000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="of the bootstrap")
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run as the client process
    ns = ap.parse_args()
    if ns.client:
        return client_main(ns.client, ns.pollers, ns.watchers, ns.poll_interval)
    if ns.rounds < 2:
        ap.error(f"--rounds={ns.rounds}: the interval needs at least 2 rounds (e.g. 8)")

    from controller.api import Job
    from controller.config import load_config

    steps = ns.warmup + 2 * ns.rounds * ns.block
    cfg = load_config(overrides=["run.progress=false", f"run.steps={steps}", "eval.enabled=false",
                                 *ns.overrides,
                                 "status.enabled=true", "status.port=0"])
    job = Job(cfg)
    server = job.status_server
    print(f"job: {job.meshes.describe()} | status {job.status_address}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for _ in range(ns.warmup):
        job.step()
    client = subprocess.Popen(
        [sys.executable, __file__, "--client", job.status_address, "--pollers",
         str(ns.pollers), "--watchers", str(ns.watchers), "--poll-interval",
         str(ns.poll_interval)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(op: dict) -> None:
        client.stdin.write(json.dumps(op) + "\n")
        client.stdin.flush()

    def recv() -> dict:
        line = client.stdout.readline()
        if not line:
            raise RuntimeError("the client process died")
        return json.loads(line)

    # Per block: (condition, step times, controller CPU per step). The controller process's
    # CPU (all its threads: loop, XLA, the link to the status server's process) is what the
    # clients cost the controller, plus what contention for the cores costs the job's threads.
    blocks: list[tuple[str, list[float], list[float]]] = []
    server_cpu = {"baseline": 0.0, "loaded": 0.0}  # the status server's process
    client_cpu = {"baseline": 0.0, "loaded": 0.0}  # the client process
    polls, stream_msgs, bad = 0, 0, []
    loaded_wall = 0.0
    order = ["baseline", "loaded", "loaded", "baseline"] * ((ns.rounds + 1) // 2)
    for cond in order[: 2 * ns.rounds]:
        first, last = job.steps_done + 1, job.steps_done + ns.block
        if cond == "loaded":
            send({"op": "start", "first": first, "last": last})
            assert recv()["op"] == "ready"
            # The client has opened its streams; wait until the server runs them too, so that
            # no connection set-up falls inside the timed block.
            deadline = time.monotonic() + 60
            while server.stats().open_watchers < ns.watchers and time.monotonic() < deadline:
                time.sleep(0.01)
        times, cpus = [], []
        t_block, s_block, c_block = (time.perf_counter(), process_cpu(server.pid),
                                     process_cpu(client.pid))
        for _ in range(ns.block):
            t0, c0 = time.perf_counter(), time.process_time()
            job.step()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        if s_block is not None:
            server_cpu[cond] += process_cpu(server.pid) - s_block
        if c_block is not None:
            client_cpu[cond] += process_cpu(client.pid) - c_block
        blocks.append((cond, times, cpus))
        if cond == "loaded":
            loaded_wall += time.perf_counter() - t_block
            send({"op": "stop"})
            done = recv()
            deadline = time.monotonic() + 60  # and the streams' ends too, before the next block
            while server.stats().open_watchers and time.monotonic() < deadline:
                time.sleep(0.01)
            polls += done["polls"]
            want = list(range(first, last + 1))
            for i, s in enumerate(done["seen"]):
                stream_msgs += len(s)
                if s != want:
                    bad.append(f"block {first}-{last} watcher {i}: got {s}")
            bad += done["errors"]
    send({"op": "quit"})
    client.wait(60)
    server_cpu_measured = process_cpu(server.pid) is not None  # before it exits
    job.close()
    load_after = os.getloadavg()

    def steps_of(cond: str, i: int) -> list[float]:
        return [x for c, *cols in blocks if c == cond for x in cols[i]]

    base, load = steps_of("baseline", 0), steps_of("loaded", 0)
    cpu = {"baseline": steps_of("baseline", 1), "loaded": steps_of("loaded", 1)}

    def row(name: str, cond: str) -> str:
        xs = steps_of(cond, 0)
        return (f"| {name:<26} | {len(xs):>5} | {statistics.mean(xs) * 1e3:>9.2f} | "
                f"{statistics.median(xs) * 1e3:>9.2f} | {pct(xs, 0.9) * 1e3:>9.2f} | "
                f"{statistics.mean(cpu[cond]) * 1e3:>13.2f} |")

    # Rounds: blocks (0, 1), (2, 3), ... each hold one block of each condition (A B | B A).
    def rounds_of(i: int) -> list[tuple[list[float], list[float]]]:
        pairs = zip(blocks[0::2], blocks[1::2], strict=True)
        return [(a[1 + i], b[1 + i]) if a[0] == "baseline" else (b[1 + i], a[1 + i])
                for a, b in pairs]

    ratio = statistics.median(load) / statistics.median(base)
    ratio_mean = statistics.mean(load) / statistics.mean(base)
    lo, hi = bootstrap_ratio(rounds_of(0), "median", ns.resamples, ns.confidence, ns.seed)
    cpu_ratio = statistics.mean(cpu["loaded"]) / statistics.mean(cpu["baseline"])
    cpu_lo, cpu_hi = bootstrap_ratio(rounds_of(1), "mean", ns.resamples, ns.confidence,
                                     ns.seed)
    print()
    print("| condition                  | steps | mean (ms) | median ms |  p90 (ms) | "
          "CPU ms / step |")
    print("|----------------------------|------:|----------:|----------:|----------:|"
          "--------------:|")
    print(row("no clients", "baseline"))
    print(row(f"{ns.pollers} pollers + {ns.watchers} watchers", "loaded"))
    print()
    print(f"GetMetrics answered while loaded: {polls} ({polls / loaded_wall:.0f}/s, each "
          f"poller every {ns.poll_interval}s) | stream messages: {stream_msgs} "
          f"(= {ns.watchers} watchers x {len(load)} loaded steps: "
          f"{stream_msgs == ns.watchers * len(load)})")
    print(f"every watcher saw every step of its block once, in order: {not bad}")
    for b in bad[:10]:
        print(f"  {b}")
    if server_cpu_measured:
        served = polls + stream_msgs
        per_call = (server_cpu["loaded"] - server_cpu["baseline"]) / max(served, 1)
        srv, srv_base = server_cpu["loaded"] / len(load), server_cpu["baseline"] / len(base)
        print(f"CPU per loaded step: status server process {srv * 1e3:.2f} ms ("
              f"{srv_base * 1e3:.2f} ms baseline; {per_call * 1e6:.0f} us per call or stream "
              f"message), client process {client_cpu['loaded'] / len(load) * 1e3:.2f} ms")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}")
    level = f"{ns.confidence:.0%} CI"
    print(f"controller CPU per step loaded / baseline: {cpu_ratio:.3f} "
          f"[{level} {cpu_lo:.3f}, {cpu_hi:.3f}]")
    result = verdict(lo, hi, ns.max_ratio)
    print(f"step time loaded / baseline: median {ratio:.3f} [{level} {lo:.3f}, {hi:.3f}], "
          f"mean {ratio_mean:.3f} (target <= {ns.max_ratio}) -> {result}")
    if bad:
        print("FAIL: a watcher missed, duplicated or reordered a step")
        return 1
    return {"PASS": 0, "FAIL": 1}.get(result, EXIT_INCONCLUSIVE)


if __name__ == "__main__":
    sys.exit(main())
