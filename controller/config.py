"""The job configuration: one frozen pydantic model, validated at the edge.

A `JobConfig` is built from (in order) its defaults, an optional YAML file, and `key.sub=value`
overrides from the command line. Every check that does not need devices runs here, before any
JAX work; device-dependent checks (does the split fit the devices?) run once in
`controller.topology`. Errors are `ConfigError`s whose lines name the field, the value and a fix:

    sampling.temperature=-1.0: Input should be greater than or equal to 0
        (fix: e.g. sampling.temperature=1.0)

This module must not import jax: the CLI validates the config, then sets the simulated device
count, and only then imports JAX.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from etils import epath
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

# run.compile_cache_dir's default; controller/startup.py points JAX's cache at it.
DEFAULT_COMPILE_CACHE_DIR = "~/.cache/tandem/xla"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names field, value and fix."""


class TopologyError(ConfigError):
    """A device split that cannot be built on the devices at hand."""


def is_url(value: str | os.PathLike | None) -> bool:
    """Whether a path a user gave names a remote store (`gs://bucket/run`, anything with
    "://") rather than a local file."""
    return value is not None and "://" in str(value)


def expand_path(value: str | None) -> str | None:
    """A path field's value with a leading `~` expanded, as a shell would; a URL (e.g.
    gs://bucket/run) is returned unchanged."""
    if value is None or is_url(value):
        return value
    return str(Path(value).expanduser())


def absolute_path(value: str | os.PathLike) -> str:
    """`value` with `~` expanded and made absolute against the current directory (orbax and
    some metadata readers need absolute paths); a URL is unchanged."""
    if is_url(value):
        return str(value)
    return str(Path(value).expanduser().absolute())


def as_path(value: str | os.PathLike) -> epath.Path:
    """The one path type for every file Tandem reads or writes: a local path (`~` expanded,
    relative kept relative, so messages show it as the user wrote it) or a URL such as
    gs://bucket/run, joined with `/` and opened alike. gs:// goes through gcsfs; `pathlib`
    would turn "gs://b/x" into the local "gs:/b/x". orbax wants absolute local paths:
    `as_path(absolute_path(value))`."""
    return epath.Path(expand_path(os.fspath(value)))


class _Section(BaseModel):
    # Each field's doc is the string literal under it; use_attribute_docstrings makes pydantic
    # read it into `FieldInfo.description`, which controller/config_reference.py renders into
    # docs/configuration.md.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoraConfig(_Section):
    """Low-rank adapters trained on the frozen base (trainer/lora.py): each targeted projection
    y = x·W becomes y = x·W + (alpha / rank)·(x·A)·B. Only A and B get gradients and optimizer
    state, and only they move to the sampler after each update."""

    rank: int = Field(8, ge=1)
    """r: the adapters' inner width."""
    alpha: float | None = Field(None, gt=0)
    """The update's scale is alpha / rank; None: 2 × rank (scale 2)."""
    targets: list[str] = list(LORA_TARGETS)
    """Projections that get adapters: q, k, v, o (attention) and gate, up, down (MLP)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The adapters' dtype (the base keeps model.dtype)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """p: in the update's policy forward each adapter's input is zeroed with probability p
    (the rest scaled by 1 / (1 - p)), as PEFT's lora_dropout; the sampler, the reference and
    recomputed π_old logprobs run without it. The masks follow run.seed and the update count,
    so a resumed run draws the same ones. With p > 0 and one optimizer step per update,
    sampler/logp_abs_diff compares the sampler with the dropped-out forward, so it reads above
    float rounding."""
    sampler: Literal["merged", "unmerged"] = "merged"
    """How the sampler applies the adapters: "merged" folds W + (alpha / rank)·A·B into its
    own copy of the weights on its devices after each sync; "unmerged" runs the two small
    matmuls beside each projection in every forward. With sampling.backend=vllm, "merged"
    pushes whole merged weights after each update; "unmerged" loads the base into vLLM once
    and then hands it only the adapters, which it serves with its LoRA support (merged pushes
    where vLLM cannot)."""

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in LORA_TARGETS]
        if unknown or not v:
            what = f"unknown target(s) {unknown}" if unknown else "no targets"
            raise ValueError(f"{what} (fix: choose from {', '.join(LORA_TARGETS)}, e.g. "
                             f"model.lora.targets=[q, v])")
        if len(set(v)) != len(v):
            raise ValueError(f"targets {v} name a projection twice (fix: list each once)")
        return v

    @property
    def scale_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


class ModelConfig(_Section):
    """The policy: a decoder-only transformer in the Llama / Qwen2 layout."""

    vocab_size: int | None = Field(None, ge=2)
    """V: vocabulary size; None: the task tokenizer's vocabulary size."""
    hidden_size: int = Field(64, ge=8)
    """d: the model width (residual stream and embeddings)."""
    num_layers: int = Field(2, ge=1)
    """Number of decoder blocks."""
    num_heads: int = Field(4, ge=1)
    """H (query heads)."""
    num_kv_heads: int = Field(2, ge=1)
    """K (key/value heads; grouped-query attention). Must divide num_heads."""
    head_dim: int | None = Field(None, ge=2)
    """Width of one attention head; None: hidden_size // num_heads."""
    mlp_dim: int = Field(256, ge=8)
    """SwiGLU inner width."""
    rope_theta: float = Field(10_000.0, gt=0)
    """θ: the rotary position embedding (RoPE) base."""
    norm_eps: float = Field(1e-6, gt=0)
    """ε added to the mean square inside RMSNorm."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the output (logits) projection."""
    qkv_bias: bool = False
    """Add biases to the q/k/v projections (Qwen2 uses biases on q/k/v)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Activation and parameter dtype."""
    init_seed: int = 0
    """Seed of the random parameter initialization (unused when `path` is set)."""
    path: str | None = None
    """A Hugging Face model directory (config.json, *.safetensors, tokenizer.json) of the
    Qwen2/2.5, Qwen3, Llama 3 or Gemma 2/3 families: local, or a gs:// URL (copied once to a
    local cache, ~/.cache/tandem/staged or $TANDEM_STAGING_DIR). When set, the architecture,
    weights and tokenizer come from it (cast to `dtype`) and the shape fields above must stay
    unset."""
    lora: LoraConfig | None = None
    """Train low-rank adapters on the frozen model instead of every weight; None: full
    fine-tuning. `model.lora={rank: 8}` turns it on with the other fields' defaults."""
    init_from: str | None = None
    """A full fine-tuning run of this same model (its run.output_dir, checkpoints/ directory or
    one step directory; local or gs://): the newest checkpoint that restores gives the initial
    weights, e.g. the base that model.lora's adapters train on."""

    @field_validator("path", "init_from")
    @classmethod
    def _expand_path(cls, v: str | None) -> str | None:
        return expand_path(v)

    @field_validator("init_from")
    @classmethod
    def _check_init_from(cls, v: str | None) -> str | None:
        if v is not None and not is_url(v) and not Path(v).is_dir():
            raise ValueError(
                f"model.init_from={v!r} is not a directory (fix: point it at a run's "
                f"run.output_dir, its checkpoints/ directory or one step directory)")
        return v

    @model_validator(mode="after")
    def _check_path(self) -> ModelConfig:
        if self.path is None:
            return self
        p = Path(self.path)
        # A bucket is checked when the job stages it (controller/storage.py): `tandem submit`
        # validates a config on a machine that may not reach the bucket.
        if not is_url(self.path) and not (p / "config.json").is_file():
            what = "does not exist" if not p.exists() else "has no config.json"
            raise ValueError(
                f"model.path={self.path!r} {what} (fix: point it at a local Hugging Face model "
                f"directory; Tandem never downloads, e.g. `huggingface-cli download "
                f"Qwen/Qwen2.5-0.5B-Instruct --local-dir DIR`)")
        shape_fields = set(type(self).model_fields) - {"path", "dtype", "lora", "init_from"}
        clash = sorted(shape_fields & self.model_fields_set)
        if clash:
            names = ", ".join(f"model.{k}" for k in clash)
            raise ValueError(
                f"model.path={self.path!r} defines the model, but {names} "
                f"{'is' if len(clash) == 1 else 'are'} also set (fix: drop {names})")
        return self

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} is not a multiple of "
                f"model.num_kv_heads={self.num_kv_heads} (fix: e.g. model.num_kv_heads=1)"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads} (fix: set model.head_dim explicitly)"
            )
        return self

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


class TopologyConfig(_Section):
    """How the job's devices are found and split into the trainer and sampler sub-meshes."""

    backend: Literal["cpu-sim", "native"] = "cpu-sim"
    """"cpu-sim": JAX's CPU backend with `simulated_devices` fake devices (the CPU-proxy mode);
    "native": whatever jax.devices() returns (TPU/GPU, or Pathways' proxy backend)."""
    simulated_devices: int = Field(8, ge=2)
    """Number of fake CPU devices in "cpu-sim" mode (ignored by "native")."""
    trainer_devices: int | None = Field(None, ge=1)
    """Trainer size as a device count; None: `trainer_fraction` of all devices."""
    trainer_fraction: float = Field(0.5, gt=0, lt=1)
    """Trainer size as a fraction of all devices, used when `trainer_devices` is None; the
    sampler gets the rest."""
    trainer_mesh: dict[str, int] = Field(default_factory=lambda: {"fsdp": -1})
    """Trainer mesh shape: axis name -> size; one axis may be -1 ("the rest")."""
    sampler_mesh: dict[str, int] = Field(default_factory=lambda: {"dp": 1, "tp": -1})
    """Sampler mesh shape: axis name -> size; one axis may be -1 ("the rest")."""
    trainer_rules: dict[str, str | None] = Field(
        default_factory=lambda: {"embed": "fsdp", "batch": "fsdp"}
    )
    """Trainer logical-axis rules: logical axis name -> mesh axis (or None = replicated)."""
    sampler_rules: dict[str, str | None] = Field(
        default_factory=lambda: {
            "heads": "tp",
            "kv_heads": "tp",
            "mlp": "tp",
            "vocab": "tp",
            "batch": "dp",
        }
    )
    """Sampler logical-axis rules: logical axis name -> mesh axis (or None = replicated)."""

    @model_validator(mode="after")
    def _check_meshes(self) -> TopologyConfig:
        for name, mesh, rules in (
            ("trainer", self.trainer_mesh, self.trainer_rules),
            ("sampler", self.sampler_mesh, self.sampler_rules),
        ):
            if not mesh:
                raise ValueError(f"topology.{name}_mesh is empty (fix: e.g. {{fsdp: -1}})")
            bad = {k: v for k, v in mesh.items() if v == 0 or v < -1}
            if bad:
                raise ValueError(
                    f"topology.{name}_mesh={mesh}: sizes must be >= 1 or -1 (the rest); "
                    f"bad: {bad}"
                )
            if sum(v == -1 for v in mesh.values()) > 1:
                raise ValueError(
                    f"topology.{name}_mesh={mesh}: at most one axis may be -1"
                )
            unknown = {v for v in rules.values() if v is not None} - set(mesh)
            if unknown:
                raise ValueError(
                    f"topology.{name}_rules map to mesh axes {sorted(unknown)} that "
                    f"topology.{name}_mesh={mesh} does not have (fix: use one of "
                    f"{sorted(mesh)} or null)"
                )
        return self

    # Pure arithmetic on a device count: `controller.topology` splits the real devices with
    # these, and `tandem submit` checks a split against a TPU type before allocating it.

    def split_counts(self, total: int) -> tuple[int, int]:
        """(trainer, sampler) device counts, both >= 1, that add up to `total`."""
        if self.trainer_devices is not None:
            n_train = self.trainer_devices
            field = f"topology.trainer_devices={n_train}"
        else:
            n_train = round(total * self.trainer_fraction)
            field = f"topology.trainer_fraction={self.trainer_fraction}"
        if not 1 <= n_train <= total - 1:
            raise TopologyError(
                f"{field} gives {n_train} trainer device(s) out of {total}; both the trainer "
                f"and the sampler need at least one (fix: topology.trainer_devices="
                f"{max(1, total // 2)})"
            )
        return n_train, total - n_train

    def mesh_shape(self, side: Literal["trainer", "sampler"], n: int) -> tuple[int, ...]:
        """The `side`'s mesh shape on `n` devices, with a -1 axis resolved."""
        shape = self.trainer_mesh if side == "trainer" else self.sampler_mesh
        sizes = dict(shape)
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if -1 in sizes.values():
            if n % fixed:
                raise TopologyError(
                    f"topology.{side}_mesh={dict(shape)}: the fixed axes (product {fixed}) do "
                    f"not divide the {n} {side} device(s) (fix: make the product divide {n})"
                )
            sizes = {k: (n // fixed if v == -1 else v) for k, v in sizes.items()}
        elif fixed != n:
            raise TopologyError(
                f"topology.{side}_mesh={dict(shape)} has {fixed} devices but the {side} side "
                f"has {n} (fix: make the sizes multiply to {n}, or use -1 for one axis)"
            )
        return tuple(sizes.values())


class SamplingConfig(_Section):
    """Generation on the sampler mesh.

    A token is drawn from softmax(logits / τ) restricted to the top-k tokens, then to the
    smallest set whose probability reaches top-p (temperature, then top-k, then top-p, as HF
    and vLLM order them). Its reported logprob is log softmax(logits / τ) *without* the
    truncation, the distribution the trainer scores (see sampler/sampling.py for why).
    """

    backend: Literal["jax", "vllm"] = "jax"
    """"jax": the compiled KV-cache sampler on the sampler mesh; "vllm": vLLM (GPU) or vLLM with
    tpu-inference (TPU), installed with `pip install 'tandem-rl[vllm]'`."""
    group_size: int = Field(8, ge=2)
    """G: completions per prompt."""
    temperature: float = Field(1.0, ge=0)
    """τ; 0 = greedy (top_k / top_p then do nothing)."""
    top_k: int = Field(0, ge=0)
    """Keep the k most likely tokens; 0 = off."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus: smallest set with mass >= p; 1 = off."""
    max_new_tokens: int = Field(6, ge=1)
    """T: completion length cap."""
    stop_tokens: list[int] = Field(default_factory=list)
    """Token ids that end a row, in addition to the tokenizer's end-of-sequence token."""
    prompt_bucket: int | None = Field(16, ge=1)
    """Prompt widths are left-padded up to prompt_bucket * 2^k, so a batch of a new width
    reuses a compiled program (at most log2(longest / prompt_bucket) + 1 programs per batch
    size). None: exact widths, one compilation per new width."""
    share_prompt: bool = True
    """The G rows of a group share one prompt: run it through the model once per group (the
    sampler's prefill, the trainer's and the reference's forward) and share its keys/values
    with the group's completions. Same numbers as per-row (up to float rounding), with the
    prompt's FLOPs divided by G. false: every row runs its own copy of the prompt. The
    trainer shares only prompts of >= 32 padded columns (trainer.trainer.SHARE_MIN_WIDTH):
    its shared forward is two model passes, which short prompts do not pay for."""
    vllm_engine_args: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for vllm.LLM(...) (backend=vllm only), e.g.
    {gpu_memory_utilization: 0.5, tensor_parallel_size: 4}."""

    @model_validator(mode="after")
    def _check_stop_tokens(self) -> SamplingConfig:
        bad = [t for t in self.stop_tokens if t < 0]
        if bad:
            raise ValueError(
                f"sampling.stop_tokens={self.stop_tokens}: token ids must be >= 0, got {bad} "
                f"(fix: e.g. sampling.stop_tokens=[2])"
            )
        return self


class AlgorithmConfig(_Section):
    """The GRPO family: advantages, clipped surrogate, KL, and the DAPO / Dr.GRPO / GSPO knobs.

    Papers: GRPO (Shao et al., 2024, DeepSeekMath); DAPO (Yu et al., 2025); Dr.GRPO (Liu et al.,
    2025, "Understanding R1-Zero-Like Training"); GSPO (Zheng et al., 2025); RLOO (Ahmadian et
    al., 2024); dual-clip PPO (Ye et al., 2020); KL estimators k1/k2/k3 (Schulman, 2020).
    """

    # -- advantages (controller/advantages.py) --
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """"grpo": (r - mean_g) / (std_g + eps), sample std (ddof=1); "dr_grpo": r - mean_g (no
    std, Liu et al., 2025); "rloo": r_i - mean_{j != i} r_j (leave-one-out, Ahmadian et al.)."""
    advantage_normalization: Literal["group", "batch"] = "group"
    """Where GRPO's std comes from: "group" (GRPO) or "batch" (std of all rewards in the batch,
    group mean kept: Lite PPO, Liu et al., 2025 "Tricks or Traps"; TRL scale_rewards="batch")."""
    advantage_eps: float = Field(1e-4, gt=0)
    """eps: added to the group std before dividing."""

    # -- policy loss (trainer/loss.py) --
    beta: float = Field(0.02, ge=0)
    """β: KL coefficient; 0 disables the reference model."""
    epsilon: float = Field(0.2, gt=0, lt=1)
    """ε: PPO clip range, ρ ∈ [1-ε, 1+ε]."""
    epsilon_low: float | None = Field(None, gt=0, lt=1)
    """ε_low, DAPO clip-higher; None: ε."""
    epsilon_high: float | None = Field(None, gt=0)
    """ε_high, DAPO (Yu et al., 2025); None: ε."""
    dual_clip_c: float | None = Field(None, gt=1)
    """c, dual-clip PPO (Ye et al., 2020), A < 0: L_pg = min(L_pg, -c·A); None: off."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """"token": ρ_t = π_θ(y_t)/π_old(y_t) (PPO/GRPO); "sequence": GSPO's
    s_i = exp(mean_t log ρ_t) (Zheng et al., 2025), as TRL's importance_sampling_level."""
    loss_aggregation: Literal[
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "token-mean"
    """How per-token losses become one number (verl's loss_agg_mode names):
    "token-mean" (DAPO; TRL "dapo"/"bnpo"), "seq-mean-token-mean" (GRPO; TRL "grpo"),
    "seq-mean-token-sum", "seq-mean-token-sum-norm" (Dr.GRPO: Σ / (B·L), TRL "dr_grpo")."""
    loss_norm_length: int | None = Field(None, ge=1)
    """L in Dr.GRPO's constant normaliser; None: sampling.max_new_tokens."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus: loss -= coef · H(π_θ)."""

    # -- KL to the frozen reference model π_ref --
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL(π_θ ‖ π_ref) estimator, Schulman (2020); k3 as in GRPO."""
    kl_penalty: Literal["loss", "reward"] = "loss"
    """"loss": + β·KL per token in the loss (GRPO); "reward": r_i -= β·Σ_t KL_t before the
    advantages (InstructGPT-style; verl use_kl_in_reward)."""
    reference_offload: bool = False
    """Keep the frozen reference model in host memory between steps and copy it to the trainer
    mesh only for the reference forward pass: frees its device memory for a host->device copy
    of its bytes per step."""

    # -- the update: μ iterations × minibatches × gradient accumulation (trainer/trainer.py) --
    num_iterations: int = Field(1, ge=1)
    """μ: passes over each batch (GRPO, Shao et al.)."""
    old_logprobs: Literal["recompute", "sampler"] = "recompute"
    """π_old for the ratio: "recompute" (trainer forward before the update; with μ = 1 and one
    minibatch π_old = sg(π_θ), no extra pass) or "sampler" (the sampler's logprobs)."""
    num_minibatches: int = Field(1, ge=1)
    """Optimizer steps per pass; rows split evenly."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Microbatches summed per optimizer step."""

    # -- DAPO data shaping (controller/loop.py) --
    dynamic_sampling: bool = False
    """Dynamic sampling: drop groups whose G reward-function scores (before the overlong
    penalty; DAPO filters on accuracy) are all equal, sample more prompts to refill the
    batch, at most `dynamic_sampling_max_retries` extra rounds; then top up with dropped ones."""
    dynamic_sampling_max_retries: int = Field(3, ge=0)
    """Extra sampling rounds dynamic sampling may run per step to refill the batch."""
    overlong_filtering: bool = False
    """DAPO: truncated completions (no stop) get no loss."""
    overlong_buffer_len: int | None = Field(None, ge=1)
    """Soft overlong punishment (DAPO eq. 13): L_cache; None disables. L_max = max_new_tokens."""
    overlong_penalty_factor: float = Field(1.0, ge=0)
    """Scales the soft overlong penalty (verl)."""

    @model_validator(mode="after")
    def _check_algorithm(self) -> AlgorithmConfig:
        if self.advantage_normalization == "batch" and self.advantage_estimator != "grpo":
            raise ValueError(
                f"algorithm.advantage_normalization='batch' only applies to "
                f"advantage_estimator='grpo' (got {self.advantage_estimator!r}, which divides "
                f"by no std) (fix: algorithm.advantage_normalization=group)"
            )
        return self

    @property
    def clip_low(self) -> float:
        """ε_low (DAPO), falling back to ε."""
        return self.epsilon if self.epsilon_low is None else self.epsilon_low

    @property
    def clip_high(self) -> float:
        """ε_high (DAPO), falling back to ε."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def uses_reference(self) -> bool:
        """β > 0 needs the frozen reference model (in the loss or in the reward)."""
        return self.beta > 0


class OptimizerConfig(_Section):
    """AdamW from optax, with global-norm clipping and a warmup + constant/cosine schedule."""

    learning_rate: float = Field(3e-3, gt=0)
    """η (peak, after warmup)."""
    b1: float = Field(0.9, ge=0, lt=1)
    """β1: Adam's first-moment decay."""
    b2: float = Field(0.99, ge=0, lt=1)
    """β2: Adam's second-moment decay."""
    weight_decay: float = Field(0.0, ge=0)
    """λ (decoupled, AdamW)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Global-norm clip; None disables clipping."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup 0 -> η, in optimizer steps."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: "constant" η, or "cosine" decay to min_lr_ratio·η over the rest of the run
    (decay_steps optimizer steps; None: run.steps × μ × num_minibatches)."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """The cosine schedule's final learning rate, as a fraction of η."""
    decay_steps: int | None = Field(None, ge=1)
    """Length of the cosine decay in optimizer steps; None: run.steps × μ × num_minibatches."""


class RewardsConfig(_Section):
    """Reward functions (name, `module:function` or file path), weights, and where calls run."""

    functions: list[str] = Field(default_factory=lambda: ["reverse_digits"], min_length=1)
    """The reward functions; r = Σ_k w_k r_k. Each entry: a registered name (`gsm8k`),
    `package.module:function`, or `path/to/file.py:function` (`path/to/file.py` alone means its
    function `reward`)."""
    weights: list[float] | None = None
    """w_k per function; None: all 1.0."""
    kwargs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Keyword arguments per function, keyed by its label (the registered name or the function's
    name), e.g. {length_penalty: {max_len: 256}}."""
    component_weights: dict[str, float] = Field(default_factory=dict)
    """A reward that returns a dict of components is summed as Σ_c w_c v_c; weights are keyed
    "<label>/<component>" and default to 1.0."""
    backend: Literal["local", "process", "ray"] = "local"
    """Where calls run: "local" in the controller process (timeouts only for pure-Python code on
    the main thread), "process" in a pool of worker processes (hard per-call timeouts; a hung
    or crashed worker is killed and replaced), "ray" in Ray actors (same semantics)."""
    timeout_s: float = Field(10.0, gt=0)
    """Per call; a call past it gets fallback_score."""
    num_workers: int = Field(2, ge=1)
    """Worker processes or Ray actors."""
    fallback_score: float = 0.0
    """The score of a call that timed out, raised or returned NaN/inf."""
    max_failure_fraction: float = Field(0.1, ge=0, le=1)
    """A step stops with an error when more than this fraction of its calls failed."""
    worker_max_calls: int | None = Field(None, ge=1)
    """Recycle a worker after this many calls; None: never."""
    ray_address: str | None = None
    """None: an already-initialized Ray, else a local one."""
    ray_num_cpus: float = Field(1.0, ge=0)
    """CPUs each Ray actor reserves."""

    @model_validator(mode="after")
    def _check_weights(self) -> RewardsConfig:
        if self.weights is not None and len(self.weights) != len(self.functions):
            raise ValueError(
                f"rewards.weights has {len(self.weights)} entries but rewards.functions has "
                f"{len(self.functions)} (fix: give one weight per function, or drop weights)"
            )
        return self


class DataConfig(_Section):
    """Prompts. The built-in task generates them deterministically from `seed`."""

    task: Literal["reverse_digits", "gsm8k", "jsonl", "parquet", "synthetic"] = "reverse_digits"
    """"reverse_digits": generated; "gsm8k": GSM8K word problems (bundled test split and a train
    subset, or `path`); "jsonl" / "parquet": your file at `path`, columns mapped by `columns`;
    "synthetic": random token-id prompts of `prompt_tokens` ids, no stop token, reward
    `synthetic_even` (the benchmark job of bench/grpo_step.py; see controller/data/synthetic.py)."""
    prompts_per_step: int = Field(16, ge=1)
    """Prompts per batch; rows = prompts_per_step * G."""
    min_digits: int = Field(2, ge=1)
    """reverse_digits task: fewest digits in a prompt's number."""
    max_digits: int = Field(4, ge=1)
    """reverse_digits task: most digits in a prompt's number."""
    prompt_tokens: int = Field(32, ge=1)
    """Synthetic task: prompt length in tokens."""
    seed: int = 0
    """Seed of the generated tasks' prompts and of the row shuffle."""
    path: str | None = None
    """The data file, local or gs:// (copied once to the local staging cache); gsm8k: None =
    the bundled split."""
    split: Literal["train", "test"] = "train"
    """gsm8k: which bundled split; reverse_digits: "train" never draws a number of the
    held-out "test" split that evaluation uses."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Row field -> file column, for "prompt" and "target" (e.g. {prompt: question})."""
    prompt_template: str | None = None
    """Python format string over the row's fields, e.g. "Q: {question}\\nA:"; None: the task's
    default (gsm8k) or the mapped "prompt" column as is."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """P_max: the longest prompt in tokens; a longer one is a bad row (skipped and reported), or
    is truncated with `truncate_prompts`. With model.path, P_max + sampling.max_new_tokens must
    fit in the model's config.json max_position_embeddings. None: 1024, or
    max_position_embeddings - sampling.max_new_tokens when that is smaller."""
    truncate_prompts: bool = False
    """A prompt longer than P_max keeps its last P_max tokens (the end holds the question and any
    generation prompt; a leading BOS stays) instead of being a bad row. Counted per step in the
    `data/truncated_prompts` metric."""
    shuffle: bool = True
    """A fresh permutation of the rows each epoch (seeded)."""

    @field_validator("path")
    @classmethod
    def _expand_path(cls, v: str | None) -> str | None:
        return expand_path(v)

    @model_validator(mode="after")
    def _check_digits(self) -> DataConfig:
        if self.min_digits > self.max_digits:
            raise ValueError(
                f"data.min_digits={self.min_digits} > data.max_digits={self.max_digits} "
                f"(fix: e.g. data.max_digits={self.min_digits})"
            )
        if self.task in ("jsonl", "parquet") and not self.path:
            raise ValueError(
                f"data.path is required for data.task={self.task} "
                f"(fix: data.path=my_prompts.{self.task})"
            )
        unknown = set(self.columns) - {"prompt", "target"}
        if unknown:
            raise ValueError(
                f"data.columns={self.columns}: unknown row fields {sorted(unknown)} "
                f"(fix: map only prompt and target, e.g. {{prompt: question, target: answer}})"
            )
        return self


class RunConfig(_Section):
    """The run as a whole."""

    name: str = Field("tandem", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The run's name, shown in status reports and logs (letters, digits, `_`, `.`, `-`)."""
    steps: int = Field(400, ge=1)
    """GRPO steps to run (one batch sampled, scored and trained on per step)."""
    seed: int = 0
    """Sampling RNG."""
    output_dir: str | None = None
    """metrics.jsonl, config.yaml, trace.json, error.log and (by default) checkpoints go here
    when set: a local directory or a gs:// URL."""
    progress: bool = True
    """Show a progress bar on the console."""
    tensorboard: bool = False
    """Also write TensorBoard events to <output_dir>/tensorboard."""
    wandb_project: str | None = None
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    resume: bool = False
    """Continue from the newest checkpoint in the checkpoint directory. Without it, a directory
    that already holds checkpoints is an error rather than silently overwritten."""

    log_samples: int = Field(0, ge=0)
    """N: write N rollouts of each step (prompt, completion, reward per function, advantage,
    length, truncation, policy version) to <output_dir>/samples.jsonl and, with
    run.tensorboard, to TensorBoard as text. 0: none."""

    export_hf_dir: str | None = None
    """After the last step, write the policy here as a Hugging Face model directory (config,
    safetensors, and model.path's tokenizer files) for transformers or vLLM. Must not exist."""
    compile_cache_dir: str | None = DEFAULT_COMPILE_CACHE_DIR
    """JAX's persistent compilation cache: compiled programs are kept here and reused when the
    same job starts again (first step ~14 s -> ~5 s on the bench's standard job). null leaves
    JAX's cache settings alone; on Pathways only an explicit (e.g. gs://) directory is used
    (see controller/startup.py)."""

    @field_validator("output_dir", "export_hf_dir")
    @classmethod
    def _expand_paths(cls, v: str | None) -> str | None:
        # Not compile_cache_dir: its default keeps "~" (controller/startup.py expands it), so
        # the default job's config and digest do not depend on the home directory.
        return expand_path(v)

    @model_validator(mode="after")
    def _check_export_dir(self) -> RunConfig:
        # Checked before the run: finding out after hours of training would be too late.
        if self.export_hf_dir is not None:
            p = as_path(self.export_hf_dir)
            if not is_url(p) and p.exists() and (not p.is_dir() or any(p.iterdir())):
                raise ValueError(
                    f"run.export_hf_dir={self.export_hf_dir!r} already exists and is not an "
                    f"empty directory (fix: choose a new directory)")
        return self


class ScheduleConfig(_Section):
    """When the sampler and trainer halves of a step run (see controller/loop.py)."""

    kind: Literal["sync", "async", "colocated"] = "sync"
    """sync: sample -> score -> update -> reshard, one after another, on disjoint meshes.
    async: the sampler samples and scores batch N+1 while the trainer updates on batch N.
    colocated: trainer and sampler share one mesh of all devices (small jobs, one slice);
    the sampler uses the trainer's layout, so the weight hand-over copies nothing."""
    max_staleness: int = Field(1, ge=0)
    """k: how many policy versions the sampler's weights may lag the trainer's (async only).
    0 = always the latest weights (same results as sync, for the same seed)."""
    is_cap: float = Field(2.0, ge=1.0)
    """C: cap of the truncated importance weight min(π_θ/μ, C) applied to stale batches."""


class CheckpointConfig(_Section):
    """Orbax checkpoints of the trainer state, data position and RNG (see trainer/checkpoint.py)."""

    dir: str | None = None
    """None: <run.output_dir>/checkpoints when output_dir is set, else off."""
    every_steps: int = Field(50, ge=0)
    """Save every this many steps; 0: only on request, on stop and at the end."""
    keep_last: int = Field(3, ge=1)
    """How many of the newest checkpoints to keep; older ones are deleted."""
    async_save: bool = True
    """Write files in the background while training goes on."""

    @field_validator("dir")
    @classmethod
    def _expand_path(cls, v: str | None) -> str | None:
        return expand_path(v)


class TrainerConfig(_Section):
    """How the update uses memory: log-probs by chunks of the sequence, and which activations
    the backward pass keeps (trainer/logprobs.py, trainer/memory.py)."""

    logits_chunk: int | None = Field(None, ge=1)
    """Completion positions per row whose logits exist at once in the update's log-probs and
    entropy (forward and backward): the peak holds [rows, chunk, vocab] float32 logits instead
    of [rows, length, vocab]. None: the whole completion when its logits take at most 64 MiB
    per device, else the largest chunk that does."""
    remat: Literal["auto", "none", "block", "matmuls"] = "auto"
    """Activation checkpointing of each transformer block in the update: "none" keeps every
    activation the backward needs; "block" keeps only each block's input and recomputes the
    block in the backward (about one more forward pass); "matmuls" keeps the projections'
    outputs and recomputes the rest (attention scores, norms, activations). "auto": "none" when
    the estimated activations fit in a quarter of a trainer device's memory, else "block"."""
    attention_chunk: int | None = Field(None, ge=1)
    """Queries a block of the update runs at once: their attention scores ([rows, heads,
    chunk, keys] float32 instead of [rows, heads, length, keys]), output projection and MLP;
    each chunk is recomputed in the backward. None: all queries while their scores take at
    most 256 MiB per device, else the largest chunk that does."""


class ReshardConfig(_Section):
    """Weight sync after each update: trainer params (trainer layout) -> sampler layout."""

    dtype: Literal["float32", "bfloat16"] | None = None
    """Dtype the sampler's weights are sent and held in. None: the model's dtype (model.dtype).
    "bfloat16": cast fp32 master weights on the trainer devices before the move (half the
    bytes on the wire; the sampler then runs with bf16 weights)."""
    chunk_bytes: int | None = Field(None, ge=1)
    """Move at most about this many bytes at once (whole leaves), so the transfer's temporaries
    (cast copies, staged relayouts) stay bounded. None: the whole tree at once."""
    donate: bool = False
    """Donate the transfer's temporaries to the move (TPU/GPU/Pathways). Ignored on CPU, where
    donated buffers that are touched again crash JAX's CPU client."""
    method: Literal["auto", "pathways", "device_put", "host_copy"] = "auto"
    """"auto": Pathways reshard when available, host_copy on CPU, device_put elsewhere."""


class StatusConfig(_Section):
    """The gRPC status service (controller/status/status.proto), served by a child process."""

    enabled: bool = True
    """Serve from Job construction to Job.close()."""
    host: str = Field("127.0.0.1", min_length=1)
    """Bind address; loopback unless a token is set."""
    port: int = Field(0, ge=0, le=65535)
    """0: pick a free port (printed by `tandem run`)."""
    token: SecretStr | None = Field(None, min_length=1)
    """Bearer token every RPC must carry (`authorization: Bearer <token>`); None: read the
    environment variable `token_env`. Required to bind a non-loopback address.
    Masked ("**********") in --print-config and the saved config.yaml; prefer the env var."""
    token_env: str = Field("TANDEM_STATUS_TOKEN", min_length=1)
    """The environment variable the token is read from when `token` is None."""
    tls_cert: str | None = None
    """PEM certificate chain; with tls_key, serve TLS."""
    tls_key: str | None = None
    """PEM private key."""
    max_workers: int = Field(32, ge=5)
    """The server's own thread pool (not the loop's). Each open WatchMetrics stream holds one
    worker; 4 stay free for unary calls, so up to max_workers - 4 watchers at once."""
    history: int = Field(10_000, ge=1)
    """Steps kept for GetMetrics windows and watch replay."""

    @field_validator("tls_cert", "tls_key")
    @classmethod
    def _expand_paths(cls, v: str | None) -> str | None:
        return expand_path(v)

    @model_validator(mode="after")
    def _check_tls(self) -> StatusConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            have, need = ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key",
                                                                               "tls_cert")
            raise ValueError(
                f"status.{have} is set but status.{need} is not; TLS needs both "
                f"(fix: set status.{need}=PATH.pem, or unset status.{have})"
            )
        return self


class EvalConfig(_Section):
    """Held-out evaluation: before training, every `every_steps` steps and at the end, on the
    sampler mesh with the sampler's current weights (see controller/eval/)."""

    enabled: bool | None = None
    """None: on where the task has a held-out split (reverse_digits, synthetic, gsm8k) or
    `path` is set, and the sampler is JAX's (vllm is not supported yet)."""
    every_steps: int = Field(50, ge=0)
    """Evaluate after every this many steps; 0: only before training and at the end."""
    split: Literal["train", "test"] = "test"
    """The task's held-out split: gsm8k's bundled test split; for reverse_digits, numbers the
    training split never draws. Ignored when `path` is set."""
    path: str | None = None
    """A held-out file (local or gs://) in data.task's format, read with data.columns and
    data.prompt_template; required for data.task=jsonl or parquet."""
    num_prompts: int = Field(64, ge=1)
    """How many held-out prompts (the first ones of the split or file, in order)."""
    samples_per_prompt: int = Field(1, ge=1)
    """n: completions per prompt."""
    k: int = Field(1, ge=1)
    """pass@k, maj@k and mean@k over each prompt's samples (n >= k)."""
    temperature: float = Field(0.0, ge=0)
    """τ for evaluation; 0 = greedy."""
    max_new_tokens: int | None = Field(None, ge=1)
    """None: sampling.max_new_tokens."""
    seed: int = 0
    """The evaluation's own random stream (training never draws from it): every evaluation of
    a run uses the same noise, so two evaluations differ only by the policy."""
    batch_rows: int = Field(256, ge=1)
    """Completions per sampler call (whole prompts' groups of n); with the other eval fields
    and the policy, it fixes what an evaluation samples."""

    @field_validator("path")
    @classmethod
    def _expand_path(cls, v: str | None) -> str | None:
        return expand_path(v)

    @model_validator(mode="after")
    def _check_k(self) -> EvalConfig:
        if self.k > self.samples_per_prompt:
            raise ValueError(
                f"eval.samples_per_prompt={self.samples_per_prompt} < eval.k={self.k}: pass@k "
                f"needs at least k samples per prompt (fix: eval.samples_per_prompt={self.k}, "
                f"or eval.k={self.samples_per_prompt})")
        return self


class EnvConfig(_Section):
    """Multi-turn rollouts: an environment the policy talks to over several turns and tools it
    may call (rewards/environments.py; the turns: controller/rollout.py). Each row alternates
    model turns with the environment's answers until it is done, `max_turns` or
    `max_total_tokens`; only the model's tokens carry loss. Off while `name` is None."""

    name: str | None = None
    """The environment: a built-in ("reverse_digits_check": reverse_digits with a `check` tool
    and retries, for the built-in model; "gsm8k_calculator": GSM8K with a calculator tool, for
    a Hugging Face chat model), `package.module:Class` or `path/to/file.py:Class` (a subclass of
    rewards.environments.Environment). None: one completion per prompt."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the environment class (one instance per row)."""
    tools: list[str] = Field(default_factory=list)
    """Tools offered besides the environment's own: `package.module:function` or
    `path/to/file.py:function`, each declared with @rewards.tools.tool (its JSON schema)."""
    max_turns: int = Field(4, ge=1)
    """Model turns per row at most (a row also ends when the environment says it is done)."""
    max_total_tokens: int | None = Field(None, ge=2)
    """T: a row's tokens after its prompt, model turns and observations together (the
    trainer's completion width); an observation that leaves no room for another model token
    ends the row. Each model turn is at most sampling.max_new_tokens. None:
    2 × max_turns × sampling.max_new_tokens."""
    history: Literal["cache", "reprefill"] = "cache"
    """How a turn after the first starts: "cache" keeps each row's keys/values and prefills only
    the model's last token and the observation; "reprefill" runs the whole history through the
    model again (docs/performance.md measures both)."""
    reward_weight: float = 1.0
    """w_env: the environment's own score (Environment.score, when it gives one) adds
    w_env · score to the reward functions' Σ_k w_k r_k, which score Environment.answer (by
    default the last model turn; for reverse_digits_check the best attempt)."""


class JobConfig(_Section):
    """Everything a Tandem job needs; the only validator."""

    model: ModelConfig = ModelConfig()
    """The policy model."""
    topology: TopologyConfig = TopologyConfig()
    """Devices and their split into trainer and sampler sub-meshes."""
    sampling: SamplingConfig = SamplingConfig()
    """Generation on the sampler mesh."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """Advantages, loss, KL and the update."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """AdamW and its learning-rate schedule."""
    rewards: RewardsConfig = RewardsConfig()
    """Reward functions and where they run."""
    data: DataConfig = DataConfig()
    """Prompts."""
    run: RunConfig = RunConfig()
    """The run as a whole."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Orbax checkpoints."""
    schedule: ScheduleConfig = ScheduleConfig()
    """When the sampler and trainer halves of a step run."""
    trainer: TrainerConfig = TrainerConfig()
    """Memory of the update: chunked log-probs and activation checkpointing."""
    reshard: ReshardConfig = ReshardConfig()
    """Weight sync from the trainer layout to the sampler layout."""
    status: StatusConfig = StatusConfig()
    """The gRPC status service."""
    eval: EvalConfig = EvalConfig()
    """Held-out evaluation during training."""
    env: EnvConfig = EnvConfig()
    """Multi-turn rollouts with an environment and tools."""

    @property
    def completion_tokens(self) -> int:
        """T, a row's columns after its prompt: sampling.max_new_tokens, or with an
        environment env.max_total_tokens (default 2 × max_turns × max_new_tokens)."""
        if self.env.name is None:
            return self.sampling.max_new_tokens
        return self.env.max_total_tokens or (
            2 * self.env.max_turns * self.sampling.max_new_tokens)

    @model_validator(mode="after")
    def _check_env(self) -> JobConfig:
        if self.env.name is None:
            return self
        if self.sampling.backend == "vllm":
            raise ValueError(
                f"env.name={self.env.name!r} with sampling.backend=vllm: multi-turn rollouts "
                f"run on the JAX sampler only (fix: sampling.backend=jax)")
        if self.eval.enabled:
            raise ValueError(
                f"eval.enabled=true with env.name={self.env.name!r}: held-out evaluation "
                f"samples one completion per prompt, not multi-turn rows (fix: "
                f"eval.enabled=false; the training metrics env/* and reward/* show progress)")
        return self

    @property
    def eval_enabled(self) -> bool:
        """Whether the job evaluates (eval.enabled, or its default for the sampler backend)."""
        if self.eval.enabled is None:
            return self.sampling.backend != "vllm" and self.env.name is None and (
                self.eval.path is not None or self.data.task not in ("jsonl", "parquet"))
        return self.eval.enabled

    @model_validator(mode="after")
    def _check_eval(self) -> JobConfig:
        e = self.eval
        if e.enabled and self.sampling.backend == "vllm":
            raise ValueError(
                "eval.enabled=true with sampling.backend=vllm: evaluation runs on the JAX "
                "sampler only (fix: eval.enabled=false, or sampling.backend=jax)")
        if not self.eval_enabled:
            return self
        if e.path is None and self.data.task in ("jsonl", "parquet"):
            raise ValueError(
                f"data.task={self.data.task} has no held-out split: evaluation needs a file "
                f"(fix: eval.path=held_out.{self.data.task}, or eval.enabled=false)")
        longest = self.data.max_digits + 1
        if (self.data.task == "reverse_digits" and e.max_new_tokens is not None
                and e.max_new_tokens < longest):
            raise ValueError(
                f"eval.max_new_tokens={e.max_new_tokens} is shorter than the longest answer of "
                f"the reverse_digits task ({longest} tokens with the stop token) (fix: "
                f"eval.max_new_tokens={longest})")
        return self

    @model_validator(mode="after")
    def _check_lengths(self) -> JobConfig:
        # The completion must have room for the longest answer plus the stop token.
        need = self.data.max_digits + 1
        if self.data.task == "reverse_digits" and self.sampling.max_new_tokens < need:
            raise ValueError(
                f"sampling.max_new_tokens={self.sampling.max_new_tokens} is shorter than the "
                f"longest answer of the reverse_digits task ({need} tokens with the stop token) "
                f"(fix: sampling.max_new_tokens={need})"
            )
        return self

    @property
    def checkpoint_dir(self) -> str | None:
        """Where checkpoints go: checkpoint.dir, else <run.output_dir>/checkpoints, else None."""
        if self.checkpoint.dir:
            return self.checkpoint.dir
        if self.run.output_dir:
            return str(as_path(self.run.output_dir) / "checkpoints")
        return None

    @model_validator(mode="after")
    def _check_task_rewards(self) -> JobConfig:
        # The default reward only makes sense for the default task.
        if self.data.task != "reverse_digits" and "reverse_digits" in self.rewards.functions:
            raise ValueError(
                f"rewards.functions={self.rewards.functions} uses reverse_digits, the reward of "
                f"the reverse_digits task, with data.task={self.data.task} "
                f"(fix: e.g. rewards.functions=[gsm8k] or your own 'file.py:function')"
            )
        return self

    @model_validator(mode="after")
    def _check_algorithm_shapes(self) -> JobConfig:
        a, g = self.algorithm, self.sampling.group_size
        rows = self.data.prompts_per_step * g
        chunks = a.num_minibatches * a.gradient_accumulation_steps
        if rows % chunks:
            raise ValueError(
                f"algorithm.num_minibatches={a.num_minibatches} x "
                f"algorithm.gradient_accumulation_steps={a.gradient_accumulation_steps} = "
                f"{chunks} does not divide the batch of {rows} rows (data.prompts_per_step="
                f"{self.data.prompts_per_step} x sampling.group_size={g}) (fix: e.g. "
                f"algorithm.num_minibatches=1 algorithm.gradient_accumulation_steps=1)"
            )
        if a.overlong_buffer_len is not None and (
                a.overlong_buffer_len >= self.sampling.max_new_tokens):
            raise ValueError(
                f"algorithm.overlong_buffer_len={a.overlong_buffer_len} must be shorter than "
                f"sampling.max_new_tokens={self.sampling.max_new_tokens} (L_cache < L_max) "
                f"(fix: e.g. algorithm.overlong_buffer_len="
                f"{max(1, self.sampling.max_new_tokens // 4)})"
            )
        return self

    def digest(self) -> str:
        """A short stable hash of the full config (for status reports and run directories)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        """The config as YAML that `load_config` reads back to an equal config (what `tandem
        submit` ships to the pod too). With model.path set, the model section is path and dtype
        only: config.json defines the rest, and setting it too is an error."""
        data = self.model_dump(mode="json")
        if self.model.path is not None:  # what was set: path, and dtype unless the default
            data["model"] = model_section(self.model.model_dump(mode="json",
                                                                exclude_defaults=True))
        return yaml.safe_dump(data, sort_keys=False)


def model_section(model: dict[str, Any]) -> dict[str, Any]:
    """A model section as a config may give it: with model.path, config.json defines the shape,
    so only path and dtype stay (setting a shape field too is an error); otherwise unchanged.
    Used for configs written out (config.yaml) and read back from checkpoints."""
    if not model.get("path"):
        return model
    return {k: model[k] for k in ("path", "dtype") if k in model}


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value parsed as YAML (so 3, 0.5, true, [a, b])."""
    if "=" not in text:
        raise ConfigError(
            f"override {text!r} has no '=' (fix: write key.sub=value, e.g. run.steps=20; a "
            f"config file must exist and end in .yaml)"
        )
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key (fix: e.g. run.steps=20)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML ({_yaml_problem(e)}) (fix: quote "
            f"it, e.g. '{key}=\"...\"')") from None
    return path, value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: where, and what."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of `data` with each `key.sub=value` override applied."""
    out = copy.deepcopy(data)  # YAML may hold dates or sets, which a JSON round trip cannot
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:  # absent, or an empty `section:` in the YAML file
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                default = _example(_default_at(path[: i + 1]))
                fix = (f"drop {where}={child!r} and set its fields" if _model_at(path[: i + 1])
                       else f"set {where} itself, e.g. {where}={default}")
                raise ConfigError(
                    f"override {text!r}: {where} is {child!r}, a value, so it has no field "
                    f"{path[i + 1]!r} (fix: {fix})")
            node = child
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Builds a JobConfig from an optional YAML file and `key.sub=value` overrides."""
    data = read_config_file(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate_config(data)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file's sections, as plain data (not yet validated)."""
    p = Path(path).expanduser()
    name = repr(str(path)) + (f" ({p})" if str(p) != str(path) else "")
    if p.is_dir():
        raise ConfigError(f"config file {name} is a directory (fix: pass a YAML file, e.g. "
                          f"examples/gsm8k.yaml)")
    if not p.is_file():
        raise ConfigError(f"config file {name} does not exist (fix: check the path; a "
                          f"relative path is read from the current directory, {Path.cwd()})")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {name} cannot be read ({type(e).__name__}: {e}) "
                          f"(fix: pass a readable UTF-8 YAML file)") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {name} is not valid YAML: {_yaml_problem(e)} (fix: "
                          f"correct that line; quote values that hold ': ' or '#')") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {name} holds a {type(loaded).__name__}, not a mapping of sections "
            f"(fix: put sections at the top level, e.g. 'run:' and under it '  steps: 20')")
    # An empty section (`sampling:` with nothing under it) means its defaults.
    return {k: {} if v is None and isinstance(k, str) and _model_at((k,)) else v
            for k, v in loaded.items()}


def validate_config(data: dict[str, Any]) -> JobConfig:
    """`JobConfig.model_validate` with errors rewritten to name field, value and fix."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def _model_at(path: tuple[Any, ...] | list[Any]) -> type[BaseModel] | None:
    """The section model at `path` (JobConfig for ()), or None when `path` is not a section."""
    model: type[BaseModel] | None = JobConfig
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _default_at(path: tuple[Any, ...] | list[Any]) -> Any:
    parent = _model_at(path[:-1])
    if parent is None or not path or path[-1] not in parent.model_fields:
        return None
    field = parent.model_fields[path[-1]]
    return field.get_default(call_default_factory=True)


def _field_of(loc: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The longest prefix of `loc` that names a config field (a list item or dict entry's
    error is fixed at its field), or None."""
    for n in range(len(loc), 0, -1):
        parent = _model_at(loc[: n - 1])
        if parent is not None and isinstance(loc[n - 1], str) and loc[n - 1] in parent.model_fields:
            return loc[:n]
    return None


def _example(value: Any) -> str:
    """A default as it is written on the command line (YAML flow style, via JSON)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def _show(value: Any, n: int = 120) -> str:
    """A value as the message shows it: repr, `null` for None, clipped to `n` characters."""
    text = "null" if value is None else repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _section_problem(key: str, section: type[BaseModel], value: Any) -> str:
    fields = list(section.model_fields)
    defaults = {f: section.model_fields[f].get_default(call_default_factory=True) for f in fields}
    numbers = [f for f, d in defaults.items() if type(d) in (int, float)]
    name = numbers[0] if numbers else fields[0]
    example = _example(defaults[name])
    return (f"  {key}={_show(value)}: {key} is a section, not a value (fix: set its "
            f"fields, e.g. {key}.{name}={example} on the command line, or '{key}:' with "
            f"'  {name}: {example}' under it in YAML; its fields: {', '.join(fields)})")


def format_validation_error(err: ValidationError) -> str:
    lines = [f"invalid config ({err.error_count()} problem(s)):"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "<config>"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            known = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean {'.'.join(map(str, (*loc[:-1], close[0])))}? " if close else ""
            lines.append(
                f"  {key}: unknown key (fix: {hint}known keys here: {', '.join(known)})"
            )
            continue
        if e["type"] == "value_error":
            # Our own validators already name field, value and fix.
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            continue
        section = _model_at(loc) if loc else None
        if section is not None:  # a value where a section belongs: `sampling=5`
            lines.append(_section_problem(key, section, value))
            continue
        field = _field_of(loc)
        if type(value) not in (str, int, float, bool, list, dict, type(None)):
            # YAML reads 2024-01-01 as a date, and so on: a string must be quoted.
            fix = f"YAML read it as a {type(value).__name__}; quote it, e.g. {key}='\"{value}\"'"
        elif field is None:
            fix = "see docs/configuration.md"
        else:
            name, default = ".".join(map(str, field)), _default_at(field)
            fix = (f"e.g. {name}={_example(default)}" if default is not None else
                   f"{name}=null for the default, or a value that satisfies this")
        lines.append(f"  {key}={_show(value)}: {e['msg']} (fix: {fix})")
    return "\n".join(lines)
