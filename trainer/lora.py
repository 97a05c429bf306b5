"""LoRA: low-rank adapters trained on a frozen base model.

Each targeted projection y = x·W becomes y = x·W + (alpha / rank)·(x·A)·B (Hu et al., 2021),
A [in, rank] drawn as PEFT draws it (uniform in ±1/sqrt(in)), B [rank, out] zero, so step 0 is
the base model exactly. The model (trainer/model.py) carries the adapters as params named
`<projection>_lora_a` / `_lora_b` next to the projection's weight when its spec has a rank; this
module splits such a params tree into the frozen base and the adapters, puts them back
together, merges adapters into the base's weights, and names them as PEFT does.

The reference model of a LoRA run is the base with the adapters switched off: the same forward
with zero adapters, whose updates are exactly zero, so no second copy of the base exists.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from controller.config import LoraConfig
from trainer.model import ModelSpec, Params

# Config names of the projections an adapter can target, and the module that holds each.
TARGETS = {"q": "attn", "k": "attn", "v": "attn", "o": "attn",
           "gate": "mlp", "up": "mlp", "down": "mlp"}
SUFFIXES = ("_lora_a", "_lora_b")
# PEFT's module names (Llama / Qwen / Gemma layouts) of each target.
PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}
# Tandem's weight name of each target's base projection.
WEIGHTS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
           "up": "up_proj", "down": "down_proj"}


def with_lora(spec: ModelSpec, rank: int, alpha: float, targets: tuple[str, ...],
              dtype: Any, dropout: float = 0.0) -> ModelSpec:
    """spec with adapters of `rank` on `targets` (config names, see TARGETS), whose inputs the
    update's policy forward drops with probability `dropout`."""
    return dataclasses.replace(spec, lora_rank=rank, lora_alpha=alpha,
                               lora_targets=tuple(targets), lora_dtype=jnp.dtype(dtype),
                               lora_dropout=float(dropout))


def configured(spec: ModelSpec, lc: LoraConfig) -> ModelSpec:
    """spec with the adapters model.lora asks for."""
    return with_lora(spec, lc.rank, lc.scale_alpha, tuple(lc.targets), lc.dtype, lc.dropout)


def is_adapter(key: Any) -> bool:
    return isinstance(key, str) and key.endswith(SUFFIXES)


def split(params: Params) -> tuple[Params, Params]:
    """(base, adapters): the params tree cut in two nested dicts of the same layout, each
    without the other's leaves (a dict left empty is dropped)."""
    base: Params = {}
    adapters: Params = {}
    for k, v in params.items():
        if isinstance(v, dict):
            b, a = split(v)
            if b:
                base[k] = b
            if a:
                adapters[k] = a
        elif is_adapter(k):
            adapters[k] = v
        else:
            base[k] = v
    return base, adapters


def combine(base: Params, adapters: Params) -> Params:
    """The params tree with both halves: `split`'s inverse."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = combine(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def switched_off(adapters: Params) -> Params:
    """Zero adapters of the same shapes: the forward they give is the base's, exactly."""
    return jax.tree.map(jnp.zeros_like, adapters)


def init_adapters(shapes: Params, seed: int) -> Params:
    """Adapters for `shapes` (the LoRA model's `ModelDef.shapes()`, adapters and all): every A
    uniform in ±1/sqrt(fan-in) (PEFT's default, kaiming-uniform with a = sqrt(5)), every B
    zero. Host arrays."""
    _, abstract = split(shapes)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        name = path[-1].key
        if name.endswith("_lora_b"):
            out.append(np.zeros(x.shape, x.dtype))
        else:
            bound = 1.0 / math.sqrt(math.prod(x.shape[:-1]))
            out.append(rng.uniform(-bound, bound, x.shape).astype(x.dtype))
    return jax.tree.unflatten(treedef, out)


def merge(spec: ModelSpec, base: Params, adapters: Params) -> Params:
    """The base's params with each adapter folded into its weight: W + (alpha / rank)·A·B, in
    W's dtype and shape (a tree the model without adapters takes). Traceable."""
    r, scale = spec.lora_rank, spec.lora_scale
    layers = {}
    for i, layer in base["layers"].items():
        new = {k: dict(v) if isinstance(v, dict) else v for k, v in layer.items()}
        for target in spec.lora_targets:
            module = TARGETS[target]
            a = adapters["layers"][i][module][f"{target}_lora_a"]
            b = adapters["layers"][i][module][f"{target}_lora_b"]
            w = layer[module][WEIGHTS[target]]
            delta = (a.reshape(-1, r).astype(jnp.float32) @ b.reshape(r, -1).astype(jnp.float32))
            new[module][WEIGHTS[target]] = (w.astype(jnp.float32)
                                            + scale * delta.reshape(w.shape)).astype(w.dtype)
        layers[i] = new
    return {**base, "layers": layers}


def adapter_bytes(adapters: Params) -> int:
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(adapters))


# -- PEFT's names and layouts -------------------------------------------------------------------

def peft_named_arrays(spec: ModelSpec, adapters: Params) -> dict[str, np.ndarray]:
    """The adapters as PEFT's `adapter_model.safetensors` holds them: for each targeted module
    `base_model.model.model.layers.{i}.{module}.lora_A.weight` [rank, in] and `lora_B.weight`
    [out, rank] (torch's Linear layout, out x in). Host arrays."""
    r = spec.lora_rank
    out = {}
    for i, layer in adapters["layers"].items():
        for target in spec.lora_targets:
            module = layer[TARGETS[target]]
            a = np.asarray(module[f"{target}_lora_a"]).reshape(-1, r)
            b = np.asarray(module[f"{target}_lora_b"]).reshape(r, -1)
            prefix = f"base_model.model.model.layers.{i}.{PEFT_MODULES[target]}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.T)
    return out


def peft_writer(spec: ModelSpec, base_model: str | None
                ) -> Callable[[Params], tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """adapters -> (their PEFT-named arrays, adapter_config.json): what a sampler that loads
    PEFT adapters (vLLM's LoRA support) writes."""
    return lambda adapters: (peft_named_arrays(spec, adapters), peft_config(spec, base_model))


def peft_config(spec: ModelSpec, base_model: str | None) -> dict[str, Any]:
    """PEFT's adapter_config.json for these adapters."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.lora_rank,
        "lora_alpha": spec.lora_alpha, "lora_dropout": spec.lora_dropout, "bias": "none",
        "target_modules": sorted(PEFT_MODULES[t].split(".")[-1] for t in spec.lora_targets),
        "base_model_name_or_path": base_model, "fan_in_fan_out": False,
        "inference_mode": True, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None,
    }
