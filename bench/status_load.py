"""Does a busy status service slow training? 50 pollers + 10 watchers vs no clients.

    python bench/status_load.py                      # the default job, 4 ABBA rounds
    python bench/status_load.py --rounds 2 --block 10 run.steps=1000 model.hidden_size=128

One job runs its steps in blocks. In a *baseline* block no client is connected; in a *loaded*
block a separate client process (as real monitoring clients would be: another process, another
machine) opens 50 channels that each poll GetMetrics every `--poll-interval` seconds (default
1 s) and 10 channels that each follow WatchMetrics. Blocks alternate A B B A ... so that drift
in the machine's load hits both conditions alike. Each step is timed around `job.step()` (so the
snapshot publishing is inside the measurement), and the controller process's CPU time per step
is reported beside it (on a shared machine the client process competes for the same cores, so
wall time also shows the clients' own cost).

It prints a table and the ratio of the median step time loaded / baseline (target <= 1.05), and
checks that every watcher of every loaded block saw every step of its block exactly once, in
order. Exit status 1 if a watcher missed, duplicated or reordered a step, or if the ratio is
above `--max-ratio`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy


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
    polls = [0] * pollers
    errors: list[str] = []
    seen: list[list[int]] = [[] for _ in range(watchers)]
    chans = [channel() for _ in range(pollers + watchers)]

    def poll(i: int) -> None:
        stub = pb_grpc.TandemStatusStub(chans[i])
        try:
            stub.GetMetrics(pb.GetMetricsRequest(window=10), timeout=30)
            polls[i] += 1
        finally:
            ready.wait()
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
# The controller process


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    ap.add_argument("--rounds", type=int, default=4, help="ABBA rounds (2 blocks each)")
    ap.add_argument("--block", type=int, default=15, help="steps per block")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    ap.add_argument("--pollers", type=int, default=50)
    ap.add_argument("--watchers", type=int, default=10)
    # 1 s: a dashboard or `watch -n1` refreshing every client once a second (50 RPC/s in all).
    ap.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls")
    ap.add_argument("--max-ratio", type=float, default=1.05)
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run as the client process
    ns = ap.parse_args()
    if ns.client:
        return client_main(ns.client, ns.pollers, ns.watchers, ns.poll_interval)

    from controller.api import Job
    from controller.config import load_config

    steps = ns.warmup + 2 * ns.rounds * ns.block
    cfg = load_config(overrides=["run.progress=false", f"run.steps={steps}", *ns.overrides,
                                 "status.enabled=true", "status.port=0"])
    job = Job(cfg)
    print(f"job: {job.meshes.describe()} | status {job.status_address}")
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

    times: dict[str, list[float]] = {"baseline": [], "loaded": []}
    # The controller process's CPU time (all its threads: loop, XLA, gRPC server) per step:
    # what the server costs the controller, whatever else the machine is running.
    cpu: dict[str, float] = {"baseline": 0.0, "loaded": 0.0}
    polls, stream_msgs, bad = 0, 0, []
    loaded_wall = 0.0
    order = ["baseline", "loaded", "loaded", "baseline"] * ((ns.rounds + 1) // 2)
    for cond in order[: 2 * ns.rounds]:
        first, last = job.steps_done + 1, job.steps_done + ns.block
        if cond == "loaded":
            send({"op": "start", "first": first, "last": last})
            assert recv()["op"] == "ready"
        t_block, c_block = time.perf_counter(), time.process_time()
        for _ in range(ns.block):
            t0 = time.perf_counter()
            job.step()
            times[cond].append(time.perf_counter() - t0)
        cpu[cond] += time.process_time() - c_block
        if cond == "loaded":
            loaded_wall += time.perf_counter() - t_block
            send({"op": "stop"})
            done = recv()
            polls += done["polls"]
            want = list(range(first, last + 1))
            for i, s in enumerate(done["seen"]):
                stream_msgs += len(s)
                if s != want:
                    bad.append(f"block {first}-{last} watcher {i}: got {s}")
            bad += done["errors"]
    send({"op": "quit"})
    client.wait(60)
    job.close()

    def row(name: str, cond: str) -> str:
        xs = times[cond]
        return (f"| {name:<26} | {len(xs):>5} | {statistics.mean(xs) * 1e3:>9.2f} | "
                f"{statistics.median(xs) * 1e3:>9.2f} | {pct(xs, 0.9) * 1e3:>9.2f} | "
                f"{cpu[cond] / len(xs) * 1e3:>13.2f} |")

    base, load = times["baseline"], times["loaded"]
    ratio = statistics.median(load) / statistics.median(base)
    ratio_mean = statistics.mean(load) / statistics.mean(base)
    print()
    print("| condition                  | steps | mean (ms) | median ms |  p90 (ms) | "
          "CPU ms / step |")
    print("|----------------------------|------:|----------:|----------:|----------:|"
          "--------------:|")
    print(row("no clients", "baseline"))
    print(row(f"{ns.pollers} pollers + {ns.watchers} watchers", "loaded"))
    print()
    print(f"GetMetrics answered: {polls} ({polls / loaded_wall:.0f}/s while loaded, each "
          f"poller every {ns.poll_interval}s) | stream messages: {stream_msgs} "
          f"(= {ns.watchers} watchers x {len(load)} loaded steps: "
          f"{stream_msgs == ns.watchers * len(load)})")
    print(f"every watcher saw every step of its block once, in order: {not bad}")
    for b in bad[:10]:
        print(f"  {b}")
    verdict = "PASS" if ratio <= ns.max_ratio and not bad else "FAIL"
    cpu_ratio = (cpu["loaded"] / len(load)) / (cpu["baseline"] / len(base))
    print(f"controller CPU per step loaded / baseline: {cpu_ratio:.3f}")
    print(f"step time loaded / baseline: median {ratio:.3f}, mean {ratio_mean:.3f} "
          f"(target <= {ns.max_ratio}) -> {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
