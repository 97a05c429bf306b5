"""What the update holds in memory, estimated from the shapes before anything compiles.

Four decisions come from these estimates:

- the log-prob chunk (`logits_chunk`): how many completion positions per row have their
  [rows, chunk, vocab] float32 logits alive at once in the update's head (trainer/logprobs.py);
- the attention chunk (`attention_chunk`): how many queries have their [rows, heads, chunk,
  keys] float32 scores alive at once in a block (trainer/model.py, `Attention`);
- the activation checkpointing policy (`resolve_remat`): what each block keeps for the backward;
- whether the update fits a trainer device at all (`UpdateMemory.check`): a config that cannot
  fit gets an error naming the fields to change, not an allocator crash mid-step.

The estimates are per trainer device and count the large buffers only: parameters, gradients,
optimizer moments, the reference model, the activations the backward keeps, and the head's
logits. XLA's own temporaries and fragmentation come on top; the fit check leaves room for them
(`HEADROOM`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from controller.config import ConfigError
from trainer.model import ModelSpec

# The most bytes one chunk of float32 logits may take per device when the chunk is chosen
# automatically. The head's backward holds about four arrays of a chunk's size at once (logits,
# log-softmax, its exponent and the logits' cotangent).
LOGITS_CHUNK_BYTES = 64 * 2**20
# The most bytes one chunk of attention scores may take per device when chosen automatically.
ATTENTION_CHUNK_BYTES = 256 * 2**20
# "auto" checkpointing keeps every activation while they take at most this share of a device.
REMAT_AUTO_SHARE = 0.25
# The share of a device's memory the estimate may fill before the fit check refuses the config.
HEADROOM = 0.9
REMAT_POLICIES = ("none", "block", "matmuls")


class MemoryBudgetError(ConfigError):
    """The update's estimated memory is more than a trainer device has."""


def logits_chunk(requested: int | None, rows: int, length: int, vocab: int) -> int | None:
    """Completion positions per chunk of the head, or None for the whole completion at once.

    requested: trainer.logits_chunk (None: automatic). rows: rows per device.
    """
    if requested is not None:
        return None if requested >= length else requested
    if rows * length * vocab * 4 <= LOGITS_CHUNK_BYTES:
        return None
    return max(1, min(length, LOGITS_CHUNK_BYTES // (rows * vocab * 4)))


def attention_chunk(requested: int | None, spec: ModelSpec, rows: int, length: int
                    ) -> int | None:
    """Queries per chunk of a block's attention, or None for all of them at once.

    requested: trainer.attention_chunk (None: automatic). rows: rows per device; length: the
    keys each query may see (prompt + completion columns).
    """
    if requested is not None:
        return None if requested >= length else requested
    per_query = rows * spec.num_heads * length * 4
    if per_query * length <= ATTENTION_CHUNK_BYTES:
        return None
    return max(1, min(length, ATTENTION_CHUNK_BYTES // per_query))


def block_activation_bytes(spec: ModelSpec, rows: int, length: int, policy: str,
                           attn_chunk: int | None = None) -> int:
    """Bytes one block keeps for its backward over `rows` sequences of `length` columns.

    "none": the inputs of every matmul, the SwiGLU's pre-activations, and the attention
    scores and probabilities in float32 (H x L x L per row; by chunks of queries, one chunk's,
    recomputed in the backward). "matmuls": the projections' outputs (q, k, v, attention output,
    gate, up, down) and the block's input. "block": the block's input only.
    """
    d, f, dh = spec.hidden_size, spec.mlp_dim, spec.head_dim
    h, k = spec.num_heads, spec.num_kv_heads
    item = np.dtype(spec.dtype).itemsize
    tokens = rows * length
    if policy == "block":
        return tokens * d * item
    proj = (h + 2 * k) * dh + h * dh + 2 * f + d  # q, k, v, attention out, gate, up, down
    if policy == "matmuls":
        return tokens * (proj + d) * item
    return tokens * (proj + 4 * d + 2 * f) * item + _scores_bytes(spec, rows, length, attn_chunk)


def _scores_bytes(spec: ModelSpec, rows: int, length: int, attn_chunk: int | None) -> int:
    """One chunk's attention scores and probabilities, float32."""
    queries = length if attn_chunk is None else min(attn_chunk, length)
    return rows * spec.num_heads * queries * length * 4 * 2


def recomputed_block_bytes(spec: ModelSpec, rows: int, length: int,
                           attn_chunk: int | None = None) -> int:
    """Bytes one block's activations take while it is recomputed for its backward. By chunks
    of queries (`Block._by_chunks`) the whole sequence's input, normed input, queries, keys,
    values and output exist with their gradients, and one chunk's activations besides."""
    if attn_chunk is None or attn_chunk >= length:
        return block_activation_bytes(spec, rows, length, "none", attn_chunk)
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    whole = 2 * rows * length * (3 * spec.hidden_size + qkv) * np.dtype(spec.dtype).itemsize
    chunk = (block_activation_bytes(spec, rows, attn_chunk, "none", attn_chunk)
             - _scores_bytes(spec, rows, attn_chunk, attn_chunk))
    return whole + chunk + _scores_bytes(spec, rows, length, attn_chunk)


def activation_bytes(spec: ModelSpec, rows: int, length: int, policy: str,
                     attn_chunk: int | None = None) -> int:
    """Bytes the forward keeps for the backward across all blocks, plus the one block whose
    activations exist in full while it is recomputed (policies other than "none")."""
    kept = spec.num_layers * block_activation_bytes(spec, rows, length, policy, attn_chunk)
    if policy != "none":
        kept += recomputed_block_bytes(spec, rows, length, attn_chunk)
    return kept


def resolve_remat(requested: str, spec: ModelSpec, rows: int, length: int,
                  device_bytes: int | None, attn_chunk: int | None = None) -> str:
    """trainer.remat with "auto" decided: "none" while every activation fits in
    REMAT_AUTO_SHARE of a device, else "block"."""
    if requested != "auto":
        return requested
    if device_bytes is None:
        return "none"
    need = activation_bytes(spec, rows, length, "none", attn_chunk)
    return "none" if need <= REMAT_AUTO_SHARE * device_bytes else "block"


@dataclass(frozen=True)
class MemoryPlan:
    """How one update runs: the head's chunk, the checkpointing policy, the attention chunk."""

    logits_chunk: int | None
    remat: str
    attention_chunk: int | None


def plan_memory(spec: ModelSpec, rows: int, prompt_len: int, completion_len: int, *,
                logits: int | None, remat: str, attention: int | None,
                device_bytes: int | None) -> MemoryPlan:
    """The config's trainer.logits_chunk, trainer.remat and trainer.attention_chunk with their
    automatic values decided for `rows` rows per device of these lengths."""
    length = prompt_len + completion_len
    attn = attention_chunk(attention, spec, rows, length)
    return MemoryPlan(logits_chunk(logits, rows, completion_len, spec.vocab_size),
                      resolve_remat(remat, spec, rows, length, device_bytes, attn), attn)


def device_memory_bytes(device: Any, devices_sharing_host: int = 1) -> int | None:
    """What one device can hold: an accelerator's allocator limit; for a CPU device, the host's
    memory (or its cgroup's limit) shared by the CPU devices of the process."""
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return stats.get("bytes_limit")
    total = host_memory_bytes()
    return None if total is None else total // max(devices_sharing_host, 1)


def host_memory_bytes() -> int | None:
    """Physical memory, or the cgroup's memory limit when that is lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


@dataclass(frozen=True)
class UpdateMemory:
    """The estimate for one batch shape on one trainer device."""

    params: int  # the policy's parameters on one device
    optimizer: int  # AdamW's two moments
    gradients: int
    reference: int  # the frozen reference model (0 without a KL term or when offloaded)
    activations: int
    logits: int  # the head's chunk of logits and its temporaries
    remat: str  # the policy the activations were estimated for
    chunk: int | None  # the head's chunk (None: the whole completion)
    attention_chunk: int | None
    device_bytes: int | None

    @property
    def total(self) -> int:
        return (self.params + self.optimizer + self.gradients + self.reference
                + self.activations + self.logits)

    def describe(self) -> str:
        gib = 2**30
        parts = (f"params {self.params / gib:.2f}, optimizer {self.optimizer / gib:.2f}, "
                 f"gradients {self.gradients / gib:.2f}, reference {self.reference / gib:.2f}, "
                 f"activations {self.activations / gib:.2f} (trainer.remat={self.remat}, "
                 f"trainer.attention_chunk={self.attention_chunk or 'all queries'}), "
                 f"logits {self.logits / gib:.2f} (trainer.logits_chunk="
                 f"{self.chunk if self.chunk is not None else 'whole completion'})")
        return f"about {self.total / gib:.2f} GiB per trainer device: {parts}"

    def check(self, rows_field: str) -> None:
        """Raises MemoryBudgetError when the estimate passes HEADROOM of the device."""
        if self.device_bytes is None or self.total <= HEADROOM * self.device_bytes:
            return
        fixes = []
        if self.remat != "block" and self.activations >= self.total / 4:
            fixes.append("trainer.remat=block (recomputes each block in the backward)")
        if self.logits >= self.total / 4 and (self.chunk is None or self.chunk > 16):
            fixes.append("trainer.logits_chunk=16")
        fixes += [f"fewer rows per update ({rows_field})",
                  "a shorter sampling.max_new_tokens or data.max_prompt_tokens",
                  "more trainer devices (topology.trainer_devices)"]
        raise MemoryBudgetError(
            f"the update does not fit: it needs {self.describe()}, more than "
            f"{HEADROOM:.0%} of the {self.device_bytes / 2**30:.2f} GiB a trainer device has "
            f"(fix: {'; or '.join(fixes)})")


def estimate_update(spec: ModelSpec, *, param_bytes: int, reference: bool, rows: int,
                    trained_bytes: int | None = None,
                    prompt_len: int, completion_len: int, plan: MemoryPlan,
                    device_bytes: int | None) -> UpdateMemory:
    """The estimate for `rows` rows per device of prompt_len + completion_len columns.

    param_bytes: the policy's parameter bytes on one device (after sharding); trained_bytes:
    those the update trains (gradients and optimizer moments; None: all of them).
    """
    trained = param_bytes if trained_bytes is None else trained_bytes
    length = prompt_len + completion_len
    c = completion_len if plan.logits_chunk is None else plan.logits_chunk
    logits = 4 * rows * c * spec.vocab_size * 4
    return UpdateMemory(
        params=param_bytes, optimizer=2 * trained, gradients=trained,
        reference=param_bytes if reference else 0,
        activations=activation_bytes(spec, rows, length, plan.remat, plan.attention_chunk),
        logits=logits, remat=plan.remat, chunk=plan.logits_chunk,
        attention_chunk=plan.attention_chunk, device_bytes=device_bytes)
