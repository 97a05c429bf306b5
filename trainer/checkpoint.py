"""Orbax checkpoints of the trainer state, and finding the newest one that restores.

A checkpoint holds the train state exactly as the trainer keeps it — params, optimizer state
and step, sharded on the trainer mesh — plus a JSON record of everything else a resume needs
(policy version, data position, RNG, the run config). Saves are asynchronous: `save` returns
once the arrays are copied off the devices, and the files are written in the background.
Orbax writes each step into a temporary directory and renames it when complete, so a save cut
off by a kill never looks complete; a checkpoint that is complete but unreadable (a corrupt
file) is skipped, with a warning, in favour of the one before it.

The reference model is not saved: it is rebuilt from where the initial weights came from (the
config's init seed or model path), which the saved config records.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from controller.config import absolute_path, as_path

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required."""


def short_reason(e: BaseException, limit: int = 240) -> str:
    """Why a read failed, in one line: the exception's type and message without the JSON
    TensorStore spec its messages carry (dozens of lines), and of a TensorStore error chain
    ("OUT_OF_RANGE: Error opening ...: ...: <cause>") only the code and the last two links."""
    text = re.sub(r"\s*\[tensorstore_spec(\[\d+\])?='.*?'\]", "", str(e), flags=re.S).strip()
    line = text.splitlines()[0] if text else ""
    parts = line.split(": ")
    if re.fullmatch(r"[A-Z][A-Z_]+", parts[0]) and len(parts) > 3:
        line = f"{parts[0]}: ...: {': '.join(parts[-2:])}"
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


_muted = False


def mute_closed_loop_noise() -> None:
    """When a read fails, TensorStore reads still in flight complete into orbax's closed
    asyncio loop, and each prints a "RuntimeError: Event loop is closed" traceback as an
    unraisable exception; asyncio logs the failed reads no one awaited, each with its JSON
    TensorStore spec. That is dozens of tracebacks beside the one-line warning that already
    says what failed. Installs, once per process, an unraisable hook and an asyncio log filter
    that drop exactly those and pass everything else on."""
    global _muted
    if _muted:
        return
    _muted = True
    previous = sys.unraisablehook

    def hook(u: Any) -> None:
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        previous(u)

    def unawaited_read(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Future exception was never retrieved")
                    and "tensorstore_spec" in text)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(unawaited_read)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """Saves and restores (train state, metadata) pairs under `directory/<step>/`."""

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3,
                 async_save: bool = True):
        # Absolute, as orbax's metadata needs; a URL (gs://...) stays a URL.
        self.directory = as_path(absolute_path(directory))
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save cut off by a kill
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], *, wait: bool = False) -> None:
        """Starts saving; returns once the arrays are off the devices (unless `wait`)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        if wait:
            self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                    meta=ocp.args.JsonRestore()),
        )
        return out["state"], dict(out["meta"])

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest checkpoint that restores cleanly, or None if there is none.

        A complete-looking checkpoint that fails to restore is moved aside (to
        `<dir>/corrupt-<step>`) so retention and later resumes do not trip on it again; the
        warning says which, why in one line, and which checkpoint is used instead.
        """
        mute_closed_loop_noise()  # before the first read: the noise can come during it
        skipped: list[tuple[int, str, Any]] = []
        found = None
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, abstract_state)
            except Exception as e:  # any failure to read means this one is unusable
                skipped.append((step, short_reason(e), self._set_aside(step)))
                continue
            found = step, state, meta
            break
        for step, why, moved_to in skipped:
            instead = (f"using the checkpoint of step {found[0]} ({self.directory / str(found[0])})"
                       f" instead" if found else "no earlier checkpoint restores")
            log.warning("checkpoint %s is unreadable (%s); moved to %s; %s",
                        self.directory / str(step), why, moved_to, instead)
        return found

    def _set_aside(self, step: int) -> Any:
        """Moves `<dir>/<step>` to `<dir>/corrupt-<step>` (or `-2`, `-3`, ... when an earlier
        resume already set that step aside); returns where it went."""
        src, dst = self.directory / str(step), self.directory / f"corrupt-{step}"
        n = 1
        while dst.exists():
            n += 1
            dst = self.directory / f"corrupt-{step}-{n}"
        if src.exists():
            src.rename(dst)
        self._manager.reload()
        return dst

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
