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

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration that cannot run; the message names field, value and fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """The policy: a decoder-only transformer in the Llama / Qwen2 layout."""

    vocab_size: int | None = Field(None, ge=2)  # None: the task tokenizer's vocabulary size
    hidden_size: int = Field(64, ge=8)  # d
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)  # H (query heads)
    num_kv_heads: int = Field(2, ge=1)  # K (key/value heads; grouped-query attention)
    head_dim: int | None = Field(None, ge=2)  # None: hidden_size // num_heads
    mlp_dim: int = Field(256, ge=8)  # SwiGLU inner width
    rope_theta: float = Field(10_000.0, gt=0)
    norm_eps: float = Field(1e-6, gt=0)
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2 uses biases on q/k/v
    dtype: Literal["float32", "bfloat16"] = "float32"  # activation and parameter dtype
    init_seed: int = 0

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

    # "cpu-sim": JAX's CPU backend with `simulated_devices` fake devices (the CPU-proxy mode);
    # "native": whatever jax.devices() returns (TPU/GPU, or Pathways' proxy backend).
    backend: Literal["cpu-sim", "native"] = "cpu-sim"
    simulated_devices: int = Field(8, ge=2)
    # Trainer size, as a device count, or (when None) as a fraction of all devices.
    trainer_devices: int | None = Field(None, ge=1)
    trainer_fraction: float = Field(0.5, gt=0, lt=1)
    # Mesh shapes: axis name -> size; one axis may be -1 ("the rest").
    trainer_mesh: dict[str, int] = Field(default_factory=lambda: {"fsdp": -1})
    sampler_mesh: dict[str, int] = Field(default_factory=lambda: {"dp": 1, "tp": -1})
    # Logical-axis rules: logical axis name -> mesh axis (or None = replicated).
    trainer_rules: dict[str, str | None] = Field(
        default_factory=lambda: {"embed": "fsdp", "batch": "fsdp"}
    )
    sampler_rules: dict[str, str | None] = Field(
        default_factory=lambda: {
            "heads": "tp",
            "kv_heads": "tp",
            "mlp": "tp",
            "vocab": "tp",
            "batch": "dp",
        }
    )

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


class SamplingConfig(_Section):
    """Generation on the sampler mesh."""

    backend: Literal["jax"] = "jax"
    group_size: int = Field(8, ge=2)  # G: completions per prompt
    temperature: float = Field(1.0, ge=0)  # 0 = greedy
    max_new_tokens: int = Field(6, ge=1)


class AlgorithmConfig(_Section):
    """The GRPO family: advantages, clipped surrogate, KL, and the DAPO / Dr.GRPO / GSPO knobs.

    Papers: GRPO (Shao et al., 2024, DeepSeekMath); DAPO (Yu et al., 2025); Dr.GRPO (Liu et al.,
    2025, "Understanding R1-Zero-Like Training"); GSPO (Zheng et al., 2025); RLOO (Ahmadian et
    al., 2024); dual-clip PPO (Ye et al., 2020); KL estimators k1/k2/k3 (Schulman, 2020).
    """

    # -- advantages (controller/advantages.py) --
    # "grpo": (r - mean_g) / (std_g + eps), sample std (ddof=1); "dr_grpo": r - mean_g (no
    # std, Liu et al., 2025); "rloo": r_i - mean_{j != i} r_j (leave-one-out, Ahmadian et al.).
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    # Where GRPO's std comes from: "group" (GRPO) or "batch" (std of all rewards in the batch,
    # group mean kept: Lite PPO, Liu et al., 2025 "Tricks or Traps"; TRL scale_rewards="batch").
    advantage_normalization: Literal["group", "batch"] = "group"
    advantage_eps: float = Field(1e-4, gt=0)  # added to the group std before dividing

    # -- policy loss (trainer/loss.py) --
    beta: float = Field(0.02, ge=0)  # β: KL coefficient; 0 disables the reference model
    epsilon: float = Field(0.2, gt=0, lt=1)  # ε: PPO clip range, ρ ∈ [1-ε, 1+ε]
    epsilon_low: float | None = Field(None, gt=0, lt=1)  # ε_low, DAPO clip-higher; None: ε
    epsilon_high: float | None = Field(None, gt=0)  # ε_high, DAPO (Yu et al., 2025); None: ε
    dual_clip_c: float | None = Field(None, gt=1)  # c, dual-clip PPO (Ye et al., 2020), A < 0
    # "token": ρ_t = π_θ(y_t)/π_old(y_t) (PPO/GRPO); "sequence": GSPO's
    # s_i = exp(mean_t log ρ_t) (Zheng et al., 2025), as TRL's importance_sampling_level.
    importance_sampling_level: Literal["token", "sequence"] = "token"
    # How per-token losses become one number (verl's loss_agg_mode names):
    # "token-mean" (DAPO; TRL "dapo"/"bnpo"), "seq-mean-token-mean" (GRPO; TRL "grpo"),
    # "seq-mean-token-sum", "seq-mean-token-sum-norm" (Dr.GRPO: Σ / (B·L), TRL "dr_grpo").
    loss_aggregation: Literal[
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "token-mean"
    # L in Dr.GRPO's constant normaliser; None: sampling.max_new_tokens.
    loss_norm_length: int | None = Field(None, ge=1)
    entropy_coef: float = Field(0.0, ge=0)  # entropy bonus: loss -= coef · H(π_θ)

    # -- KL to the frozen reference model π_ref --
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # Schulman (2020); k3 as in GRPO
    # "loss": + β·KL per token in the loss (GRPO); "reward": r_i -= β·Σ_t KL_t before the
    # advantages (InstructGPT-style; verl use_kl_in_reward).
    kl_penalty: Literal["loss", "reward"] = "loss"

    # -- the update: μ iterations × minibatches × gradient accumulation (trainer/trainer.py) --
    num_iterations: int = Field(1, ge=1)  # μ: passes over each batch (GRPO, Shao et al.)
    # π_old for the ratio: "recompute" (trainer forward before the update; with μ = 1 and one
    # minibatch π_old = sg(π_θ), no extra pass) or "sampler" (the sampler's logprobs).
    old_logprobs: Literal["recompute", "sampler"] = "recompute"
    num_minibatches: int = Field(1, ge=1)  # optimizer steps per pass; rows split evenly
    gradient_accumulation_steps: int = Field(1, ge=1)  # microbatches summed per optimizer step

    # -- DAPO data shaping (controller/loop.py) --
    # Dynamic sampling: drop groups whose G reward-function scores (before the overlong
    # penalty; DAPO filters on accuracy) are all equal, sample more prompts to refill the
    # batch, at most `dynamic_sampling_max_retries` extra rounds; then top up with dropped ones.
    dynamic_sampling: bool = False
    dynamic_sampling_max_retries: int = Field(3, ge=0)
    overlong_filtering: bool = False  # DAPO: truncated completions (no stop) get no loss
    # Soft overlong punishment (DAPO eq. 13): L_cache; None disables. L_max = max_new_tokens.
    overlong_buffer_len: int | None = Field(None, ge=1)
    overlong_penalty_factor: float = Field(1.0, ge=0)  # scales the soft penalty (verl)

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

    learning_rate: float = Field(3e-3, gt=0)  # η (peak, after warmup)
    b1: float = Field(0.9, ge=0, lt=1)  # β1
    b2: float = Field(0.99, ge=0, lt=1)  # β2
    weight_decay: float = Field(0.0, ge=0)  # λ (decoupled, AdamW)
    max_grad_norm: float | None = Field(1.0, gt=0)  # global-norm clip; None disables clipping
    warmup_steps: int = Field(0, ge=0)  # linear warmup 0 -> η, in optimizer steps
    # After warmup: "constant" η, or "cosine" decay to min_lr_ratio·η over the rest of the run
    # (decay_steps optimizer steps; None: run.steps × μ × num_minibatches).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    decay_steps: int | None = Field(None, ge=1)


class RewardsConfig(_Section):
    """Reward functions by registered name or `module:function`, summed with weights."""

    functions: list[str] = Field(default_factory=lambda: ["reverse_digits"], min_length=1)
    weights: list[float] | None = None  # None: all 1.0

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

    task: Literal["reverse_digits"] = "reverse_digits"
    prompts_per_step: int = Field(16, ge=1)  # prompts per batch; rows = prompts_per_step * G
    min_digits: int = Field(2, ge=1)
    max_digits: int = Field(4, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check_digits(self) -> DataConfig:
        if self.min_digits > self.max_digits:
            raise ValueError(
                f"data.min_digits={self.min_digits} > data.max_digits={self.max_digits} "
                f"(fix: e.g. data.max_digits={self.min_digits})"
            )
        return self


class RunConfig(_Section):
    """The run as a whole."""

    name: str = Field("tandem", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    steps: int = Field(400, ge=1)
    seed: int = 0  # sampling RNG
    output_dir: str | None = None  # metrics.jsonl and config.yaml go here when set
    progress: bool = True  # show a progress bar on the console


class JobConfig(_Section):
    """Everything a Tandem job needs; the only validator."""

    model: ModelConfig = ModelConfig()
    topology: TopologyConfig = TopologyConfig()
    sampling: SamplingConfig = SamplingConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    rewards: RewardsConfig = RewardsConfig()
    data: DataConfig = DataConfig()
    run: RunConfig = RunConfig()

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
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value parsed as YAML (so 3, 0.5, true, [a, b])."""
    if "=" not in text:
        raise ConfigError(
            f"override {text!r} has no '=' (fix: write key.sub=value, e.g. run.steps=20)"
        )
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key (fix: e.g. run.steps=20)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from e
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of `data` with each `key.sub=value` override applied."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section"
                )
            node = child
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Builds a JobConfig from an optional YAML file and `key.sub=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (fix: check the path)")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(p)!r} must hold a mapping of sections, got "
                f"{type(loaded).__name__}"
            )
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> JobConfig:
    """`JobConfig.model_validate` with errors rewritten to name field, value and fix."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = JobConfig
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _default_at(path: tuple[Any, ...]) -> Any:
    parent = _model_at(path[:-1])
    if parent is None or not path or path[-1] not in parent.model_fields:
        return None
    field = parent.model_fields[path[-1]]
    return field.get_default(call_default_factory=True)


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
            hint = f"did you mean {'.'.join(map(str, (*loc[:-1], close[0])))}?" if close else ""
            lines.append(
                f"  {key}: unknown key (fix: {hint} known keys here: {', '.join(known)})"
            )
            continue
        if e["type"] == "value_error":
            # Our own validators already name field, value and fix.
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            continue
        default = _default_at(loc)
        fix = f"e.g. {key}={json.dumps(default)}" if default is not None else "see the docs"
        lines.append(f"  {key}={value!r}: {e['msg']} (fix: {fix})")
    return "\n".join(lines)
