"""User reward functions for the reward-backend tests, loaded by file path (`file.py:fn`)."""

import os
import signal
import time


def exact(prompt, completion, row):
    return float(completion == row["target"])


def with_ids(prompt, completion, row, completion_ids=None):
    return float(len(completion_ids))


def parts(prompt, completion, row, *, scale=1.0):
    return {"len": scale * len(completion), "one": 1.0}


def sleep_forever(prompt, completion, row):
    if completion == "hang":
        while True:
            time.sleep(1)
    return 1.0


def raises(prompt, completion, row):
    if completion == "bad":
        raise ValueError(f"cannot score {completion!r}")
    return 1.0


def nan(prompt, completion, row):
    return float("nan") if completion == "bad" else 0.5


def not_a_number(prompt, completion, row):
    return "high"


def dies(prompt, completion, row):
    if completion == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return 1.0


def always_raises(prompt, completion, row):
    raise RuntimeError("this reward is broken")


SANDBOX_MARKER_MB = 517  # shows up in the sandbox's command line as 517 << 20


def sandbox_sleeps(prompt, completion, row):
    from rewards.sandbox import run_python

    return float(run_python("import time\ntime.sleep(60)", timeout_s=60,
                            memory_mb=SANDBOX_MARKER_MB).ok)


def hang_with_heartbeat(prompt, completion, row):
    """Hangs on "hang", writing time.monotonic() every 10 ms to a new file in
    row["heartbeat_dir"] until it is cut: its first and last lines show how long it ran."""
    if completion != "hang":
        return 1.0
    path = os.path.join(row["heartbeat_dir"], f"{os.getpid()}-{time.monotonic_ns()}")
    with open(path, "w") as f:
        while True:
            f.write(f"{time.monotonic()}\n")
            f.flush()
            time.sleep(0.01)


def fails_on_held_out(prompt, completion, row):
    """reverse_digits' reward, raising on the held-out split's numbers (which only evaluation
    draws)."""
    from controller.data.tasks import held_out
    from rewards.builtin import reverse_digits

    if held_out(row["target"][::-1]):
        raise RuntimeError("this reward cannot score held-out prompts")
    return reverse_digits(prompt, completion, row)
