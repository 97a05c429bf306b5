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
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator


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
    """GRPO (Shao et al., 2024, DeepSeekMath): group-relative advantages, clipped surrogate."""

    beta: float = Field(0.02, ge=0)  # β: KL coefficient; 0 disables the reference model
    epsilon: float = Field(0.2, gt=0, lt=1)  # ε: PPO clip range
    advantage_eps: float = Field(1e-4, gt=0)  # added to the group std before dividing
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"


class OptimizerConfig(_Section):
    """AdamW from optax."""

    learning_rate: float = Field(3e-3, gt=0)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.99, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None disables clipping
    warmup_steps: int = Field(0, ge=0)


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


class StatusConfig(_Section):
    """The gRPC status service (controller/status.proto) that runs inside the controller."""

    enabled: bool = True  # serve from Job construction to Job.close()
    host: str = Field("127.0.0.1", min_length=1)  # bind address; loopback unless a token is set
    port: int = Field(0, ge=0, le=65535)  # 0: pick a free port (printed by `tandem run`)
    # Bearer token every RPC must carry (`authorization: Bearer <token>`); None: read the
    # environment variable `token_env`. Required to bind a non-loopback address.
    # Masked ("**********") in --print-config and the saved config.yaml; prefer the env var.
    token: SecretStr | None = Field(None, min_length=1)
    token_env: str = Field("TANDEM_STATUS_TOKEN", min_length=1)
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, serve TLS
    tls_key: str | None = None  # PEM private key
    # The server's own thread pool (not the loop's). Each open WatchMetrics stream holds one
    # worker; 4 stay free for unary calls, so up to max_workers - 4 watchers at once.
    max_workers: int = Field(32, ge=5)
    history: int = Field(10_000, ge=1)  # steps kept for GetMetrics windows and watch replay

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
    status: StatusConfig = StatusConfig()

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
