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
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required."""


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """Saves and restores (train state, metadata) pairs under `directory/<step>/`."""

    def __init__(self, directory: str | Path, *, keep_last: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
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
        `<dir>/corrupt-<step>`) so retention and later resumes do not trip on it again.
        """
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, abstract_state)
            except Exception as e:  # any failure to read means this one is unusable
                log.warning("checkpoint %s/%d is unreadable (%s: %s); trying the previous one",
                            self.directory, step, type(e).__name__, e)
                self._set_aside(step)
                continue
            return step, state, meta
        return None

    def _set_aside(self, step: int) -> None:
        src = self.directory / str(step)
        if src.exists():
            shutil.move(str(src), str(self.directory / f"corrupt-{step}"))
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
