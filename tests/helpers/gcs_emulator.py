"""A Google Cloud Storage emulator on loopback for the gs:// tests.

`gcp-storage-emulator` (a dev dependency, from PyPI) speaks the GCS JSON API that gcsfs
(etils.epath's gs:// backend) and tensorstore (orbax's array store) both use. `start()` runs
it (through gcs_emulator_server.py, which adds what tensorstore needs) in memory on a free
port with one bucket and returns the environment that points both
clients at it, with test credentials, as a job on Cloud TPU would be pointed at GCS.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BUCKET = "tandem-test"


@dataclass
class Emulator:
    proc: subprocess.Popen
    url: str
    log: Path  # the server's stderr: a file, so a chatty server never blocks on a full pipe
    env: dict[str, str] = field(default_factory=dict)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(timeout_s: float = 30.0) -> Emulator:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkstemp(prefix="gcs-emulator-", suffix=".log")[1])
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "helpers.gcs_emulator_server", "start", "--host",
             "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", BUCKET,
             "--quiet"],
            stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).parents[1]),
                 *filter(None, [os.environ.get("PYTHONPATH")])])})
    emulator = Emulator(proc, url, log)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the GCS emulator did not start: {emulator.log_tail()}"
                                   ) from None
            time.sleep(0.1)
    emulator.env = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no Application Default Credentials to look up
        # gcsfs's hierarchical-namespace probe speaks gRPC, which the emulator does not.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax's arrays)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore's credentials
    }
    return emulator


def use_in_this_process(emulator: Emulator) -> None:
    """Points this process's gcsfs and tensorstore at `emulator`."""
    os.environ.update(emulator.env)
    core = sys.modules.get("gcsfs.core")
    if core is not None:  # imported before: it read STORAGE_EMULATOR_HOST at import
        core._emulator_location = emulator.url


def forget_listings() -> None:
    """Drops this process's cached bucket listings (gcsfs caches them; another process's
    writes do not invalidate them)."""
    import fsspec

    cls = type(fsspec.filesystem("gs"))
    for fs in list(cls._cache.values()):  # one instance per set of options (epath uses its own)
        fs.invalidate_cache()
