"""Hugging Face checkpoints <-> Tandem params: Qwen2/2.5, Qwen3, Llama 3 and Gemma 2/3 (text).

Reading a local HF directory:

    spec = load_hf_spec(path, dtype="bfloat16")            # config.json -> ModelSpec
    mdef = define_model(spec)
    params = load_hf_params(path, mdef, shardings=param_shardings(mdef, meshes.trainer))
    # or both at once: spec, params = load_hf_model(path, dtype=..., shardings=...)

Each tensor is memory-mapped from its safetensors file and placed with
`jax.make_array_from_callback`: every device reads only its own slice of the file (through a
numpy view that already has Tandem's layout), so neither the full model nor a full tensor is
ever materialised on one device (replicated tensors aside). bf16 / fp16 / fp32 on disk are cast
to the requested dtype slice by slice.

Writing: `save_hf_model(path, spec, params, source_dir=...)` writes config.json, safetensors
shards (with `model.safetensors.index.json` when there are several) and copies the tokenizer and
generation files from `source_dir`, in the layout `transformers.AutoModelForCausalLM` and vLLM
read. The directory appears whole or not at all (it is written beside and renamed).

Layouts. HF stores a linear layer as weight [out, in]; Tandem keeps [in, out] with heads split:
q_proj [D, H, Dh] = W_q.T.reshape(D, H, Dh); o_proj [H, Dh, D] = W_o.T.reshape(H, Dh, D);
gate/up [D, F] = W.T; down [F, D] = W.T; lm_head [D, V] = W.T; embeddings and norms as stored
(Gemma's norm weight w is kept as stored and applied as 1 + w).

No network: only local files are read; a missing file is an `HFCheckpointError` naming it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from controller.config import as_path
from trainer.model import ModelDef, ModelSpec, Params, RopeScaling, define_model

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# Defaults of the transformers config classes for fields a config.json may leave out.
_TIE_DEFAULT = {"llama": False, "qwen2": False, "qwen3": False, "gemma2": True,
                "gemma3_text": True}
# Files copied verbatim from the source directory on save (those that exist).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "generation_config.json",
)
_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class HFCheckpointError(ValueError):
    """A HF directory Tandem cannot read or write; the message names the file and a fix."""


# ---------------------------------------------------------------------------------------------
# config.json -> ModelSpec


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a HF model directory, local or gs:// (only that file is
    read)."""
    path = as_path(path)
    if not path.is_dir():
        raise HFCheckpointError(
            f"model.path={str(path)!r} is not a directory (fix: point model.path at a "
            f"Hugging Face model directory, local or gs://, holding config.json and "
            f"*.safetensors; Tandem never downloads from a hub, so fetch it first, e.g. "
            f"`huggingface-cli download ORG/NAME --local-dir "
            f"DIR`)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise HFCheckpointError(f"{cfg_file} does not exist (fix: model.path must be a Hugging "
                                f"Face model directory with a config.json)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{cfg_file} is not valid JSON: {e}") from None


def _rope_scaling(params: dict[str, Any], where: str, max_pos: int) -> RopeScaling | None:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3", float(params["factor"]), float(params.get("low_freq_factor", 1.0)),
            float(params.get("high_freq_factor", 4.0)),
            int(params.get("original_max_position_embeddings", max_pos)))
    raise HFCheckpointError(
        f"{where}: rope_type={kind!r} is not supported (supported: default, linear, llama3)")


def _rope(cfg: dict[str, Any], mt: str, where: str
          ) -> tuple[float, RopeScaling | None, float | None]:
    """(global theta, global scaling, local theta) from `rope_parameters` (transformers >= 5)
    or the older top-level `rope_theta` / `rope_scaling` / `rope_local_base_freq`."""
    max_pos = int(cfg.get("max_position_embeddings", 8192))
    rp = cfg.get("rope_parameters")
    if mt == "gemma3_text":
        if rp and "full_attention" in rp:
            full, local = rp["full_attention"] or {}, rp.get("sliding_attention") or {}
        else:
            full = dict(cfg.get("rope_scaling") or {})
            full.setdefault("rope_theta", cfg.get("rope_theta", 1e6))
            local = {"rope_theta": cfg.get("rope_local_base_freq", 1e4)}
        if _rope_scaling(local, f"{where} (sliding_attention)", max_pos) is not None:
            raise HFCheckpointError(f"{where}: RoPE scaling on sliding layers is not supported")
        return (float(full.get("rope_theta", 1e6)),
                _rope_scaling(full, f"{where} (full_attention)", max_pos),
                float(local.get("rope_theta", 1e4)))
    if rp and any(k in rp for k in ("full_attention", "sliding_attention")):
        raise HFCheckpointError(f"{where}: per-layer-type rope_parameters are only supported "
                                f"for gemma3_text")
    params = dict(rp or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10_000.0)))
    return theta, _rope_scaling(params, where, max_pos), None


def _sliding_layers(cfg: dict[str, Any], mt: str, n: int) -> tuple[int | None, tuple[bool, ...]]:
    """(window W, per-layer sliding flags) as transformers derives them for each family."""
    types = cfg.get("layer_types")
    window = cfg.get("sliding_window")
    if mt in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window", False):
            return None, ()
        if types is None:
            first = int(cfg.get("max_window_layers", 28))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    elif mt == "gemma2":
        window = cfg.get("sliding_window", 4096)
        types = types or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                          for i in range(n)]
    elif mt == "gemma3_text":
        window = cfg.get("sliding_window", 4096)
        pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)))
        types = types or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                          for i in range(n)]
    elif types is None or window is None:
        return None, ()
    flags = tuple(t == "sliding_attention" for t in types)
    if len(flags) != n:
        raise HFCheckpointError(f"layer_types has {len(flags)} entries for {n} layers")
    if not any(flags) or window is None:
        return None, ()
    return int(window), flags


def spec_from_hf_config(cfg: dict[str, Any], dtype: Any = "float32",
                        where: str = "config.json") -> ModelSpec:
    """The ModelSpec of a HF config dict; unsupported options are errors, never ignored."""
    import jax.numpy as jnp

    mt = cfg.get("model_type")
    if mt == "gemma3" and "text_config" in cfg:
        raise HFCheckpointError(
            f"{where}: model_type='gemma3' is the multimodal Gemma3ForConditionalGeneration; "
            f"Tandem loads text-only checkpoints (fix: use a text-only Gemma 3 such as "
            f"gemma-3-1b, or save its language model with Gemma3ForCausalLM first)")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise HFCheckpointError(f"{where}: model_type={mt!r} is not supported (fix: use a "
                                f"model of a supported family: "
                                f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    gemma = mt.startswith("gemma")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or (
        "gelu_pytorch_tanh" if gemma else "silu")
    acts = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
            "gelu_tanh": "gelu_tanh"}
    if act not in acts:
        raise HFCheckpointError(f"{where}: activation {act!r} is not supported "
                                f"(supported: {', '.join(acts)})")
    if cfg.get("mlp_bias"):
        raise HFCheckpointError(f"{where}: mlp_bias=true is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise HFCheckpointError(f"{where}: use_bidirectional_attention=true is not supported "
                                f"(Tandem trains causal decoders)")
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    hidden = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    theta, scaling, local_theta = _rope(cfg, mt, where)
    window, sliding = _sliding_layers(cfg, mt, layers)
    attn_bias = bool(cfg.get("attention_bias", False))
    qpas = cfg.get("query_pre_attn_scalar", 256) if gemma else None
    return ModelSpec(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        mlp_dim=int(cfg["intermediate_size"]),
        rope_theta=theta,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", _TIE_DEFAULT[mt])),
        qkv_bias=True if mt == "qwen2" else attn_bias,
        dtype=jnp.dtype(dtype),
        o_bias=False if mt == "qwen2" else attn_bias,
        qk_norm=mt in ("qwen3", "gemma3_text"),
        norm_plus_one=gemma,
        sandwich_norm=gemma,
        mlp_activation=acts[act],
        embed_scale=math.sqrt(hidden) if gemma else 1.0,
        attn_scale=float(qpas) ** -0.5 if gemma else None,
        attn_softcap=cfg.get("attn_logit_softcapping", 50.0 if mt == "gemma2" else None),
        final_softcap=cfg.get("final_logit_softcapping", 30.0 if mt == "gemma2" else None),
        rope_scaling=scaling,
        sliding_window=window,
        sliding_layers=sliding,
        local_rope_theta=local_theta if window is not None else None,
        hf_model_type=mt,
    )


def load_hf_spec(path: str | Path, dtype: Any = "float32") -> ModelSpec:
    """config.json of a local HF directory -> ModelSpec with params in `dtype`."""
    cfg, where = read_hf_config(path), str(as_path(path) / "config.json")
    if not isinstance(cfg, dict):
        raise HFCheckpointError(f"{where} holds a {type(cfg).__name__}, not a JSON object (fix: "
                                f"download the model again)")
    try:
        return spec_from_hf_config(cfg, dtype, where)
    except HFCheckpointError:
        raise
    except KeyError as e:
        raise HFCheckpointError(f"{where} has no {e.args[0]!r}, which a {cfg.get('model_type')} "
                                f"config needs (fix: download the model's config.json again)"
                                ) from None
    except (TypeError, ValueError) as e:
        raise HFCheckpointError(f"{where} has a value of the wrong type ({e}) (fix: download "
                                f"the model's config.json again)") from None


def hf_config_from_spec(spec: ModelSpec, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json for `spec` (keys of `base`, e.g. token ids, kept unless they conflict)."""
    mt = spec.hf_model_type
    if mt is None:  # the built-in model: Qwen2's layout has q/k/v biases, Llama's has none
        mt = "qwen2" if spec.qkv_bias and not spec.o_bias else "llama"
    if mt == "qwen2" and (not spec.qkv_bias or spec.o_bias):
        raise HFCheckpointError("qwen2 needs q/k/v biases and no o_proj bias")
    if spec.qkv_bias != spec.o_bias and mt != "qwen2":
        raise HFCheckpointError(f"{mt}: attention_bias covers q/k/v and o_proj together; this "
                                f"spec has qkv_bias={spec.qkv_bias}, o_bias={spec.o_bias}")
    gemma = mt.startswith("gemma")
    cfg = {k: v for k, v in (base or {}).items()
           if k not in ("rope_scaling", "rope_theta", "rope_local_base_freq", "torch_dtype",
                        "sliding_window_pattern", "_sliding_window_pattern")}
    dtype = np.dtype(spec.dtype).name
    layer_types = [("sliding_attention" if spec.is_sliding(i) else "full_attention")
                   for i in range(spec.num_layers)]

    def rope_dict(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
        if scaling is None:
            return {"rope_type": "default", "rope_theta": theta}
        out: dict[str, Any] = {"rope_type": scaling.kind, "rope_theta": theta,
                               "factor": scaling.factor}
        if scaling.kind == "llama3":
            out |= {"low_freq_factor": scaling.low_freq_factor,
                    "high_freq_factor": scaling.high_freq_factor,
                    "original_max_position_embeddings": scaling.original_max_position}
        return out

    cfg |= {
        "architectures": [_ARCHITECTURES[mt]],
        "model_type": mt,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.mlp_dim,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_embeddings,
        "dtype": dtype,
        "torch_dtype": dtype,  # the pre-5.0 name, which vLLM and older transformers read
        "layer_types": layer_types,
    }
    cfg.setdefault("max_position_embeddings", 32768)
    if mt == "gemma3_text":
        cfg["rope_parameters"] = {
            "full_attention": rope_dict(spec.rope_theta, spec.rope_scaling),
            "sliding_attention": rope_dict(spec.local_rope_theta or spec.rope_theta, None)}
    else:
        cfg["rope_parameters"] = rope_dict(spec.rope_theta, spec.rope_scaling)
    if mt != "qwen2":
        cfg["attention_bias"] = spec.qkv_bias
    if gemma:
        scale = spec.attn_scale if spec.attn_scale is not None else spec.head_dim**-0.5
        cfg |= {"hidden_activation": "gelu_pytorch_tanh",
                "query_pre_attn_scalar": round(scale**-2),
                "attn_logit_softcapping": spec.attn_softcap,
                "final_logit_softcapping": spec.final_softcap,
                "sliding_window": spec.sliding_window}
        cfg.pop("hidden_act", None)
    else:
        cfg["hidden_act"] = "silu"
        if spec.sliding_window is not None:
            first = next(i for i in range(spec.num_layers) if spec.is_sliding(i))
            cfg |= {"use_sliding_window": True, "sliding_window": spec.sliding_window,
                    "max_window_layers": first}
        elif mt in ("qwen2", "qwen3"):
            cfg |= {"use_sliding_window": False}
    return cfg


# ---------------------------------------------------------------------------------------------
# Parameter names and layouts


@dataclass(frozen=True)
class _Entry:
    hf_name: str
    path: tuple[Any, ...]  # key path into the Tandem params dict
    to_tandem: Callable[[np.ndarray], np.ndarray]  # HF array -> Tandem layout (a view)
    to_hf: Callable[[np.ndarray], np.ndarray]  # Tandem array -> HF layout


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def param_map(spec: ModelSpec) -> list[_Entry]:
    """Every Tandem param with its HF tensor name and the layout changes between them."""
    h, k, dh, d = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size

    def heads_in(n: int):  # [n*Dh, D] <-> [D, n, Dh]
        return (lambda x: x.T.reshape(d, n, dh)), (lambda x: x.reshape(d, n * dh).T)

    def bias(n: int):
        return (lambda x: x.reshape(n, dh)), (lambda x: x.reshape(n * dh))

    out = [_Entry("model.embed_tokens.weight", ("embed",), _identity, _identity),
           _Entry("model.norm.weight", ("final_norm", "scale"), _identity, _identity)]
    if not spec.tie_embeddings:
        out.append(_Entry("lm_head.weight", ("lm_head",), _transpose, _transpose))
    for i in range(spec.num_layers):
        p, L = f"model.layers.{i}.", ("layers", i)
        attn = [("q_proj", *heads_in(h)), ("k_proj", *heads_in(k)), ("v_proj", *heads_in(k)),
                ("o_proj", lambda x: x.T.reshape(h, dh, d), lambda x: x.reshape(h * dh, d).T)]
        out += [_Entry(f"{p}self_attn.{n}.weight", (*L, "attn", n), a, b) for n, a, b in attn]
        if spec.qkv_bias:
            out += [_Entry(f"{p}self_attn.{n}_proj.bias", (*L, "attn", f"{n}_bias"), *bias(m))
                    for n, m in (("q", h), ("k", k), ("v", k))]
        if spec.o_bias:
            out.append(_Entry(f"{p}self_attn.o_proj.bias", (*L, "attn", "o_bias"), _identity,
                              _identity))
        if spec.qk_norm:
            out += [_Entry(f"{p}self_attn.{n}.weight", (*L, "attn", n, "scale"), _identity,
                           _identity) for n in ("q_norm", "k_norm")]
        out += [_Entry(f"{p}mlp.{n}.weight", (*L, "mlp", n), _transpose, _transpose)
                for n in ("gate_proj", "up_proj", "down_proj")]
        norms = [("input_layernorm", "input_norm"), ("post_attention_layernorm",
                                                     "post_attn_norm")]
        if spec.sandwich_norm:
            norms += [("pre_feedforward_layernorm", "pre_mlp_norm"),
                      ("post_feedforward_layernorm", "post_mlp_norm")]
        out += [_Entry(f"{p}{n}.weight", (*L, t, "scale"), _identity, _identity)
                for n, t in norms]
    return out


def _get(tree: Params, path: tuple[Any, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# safetensors, memory-mapped


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """name -> read-only numpy view into the memory-mapped file (nothing is read yet)."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFCheckpointError(f"{file} is not a readable safetensors file: {e}") from None
    header.pop("__metadata__", None)
    if not header:
        return {}
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise HFCheckpointError(f"{file}: tensor {name} has dtype {info['dtype']}, which "
                                    f"Tandem does not read (quantized checkpoints are not "
                                    f"supported)")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a HF directory: from the index json, or the single file."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise HFCheckpointError(f"{index} lists shards that do not exist: {missing} "
                                    f"(fix: download the complete checkpoint)")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise HFCheckpointError(
        f"{path} has neither model.safetensors nor model.safetensors.index.json (fix: Tandem "
        f"reads safetensors only; convert *.bin with transformers: "
        f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir))")


def load_hf_params(path: str | Path, mdef: ModelDef, *, shardings: Params | None = None
                   ) -> Params:
    """The params of a HF directory in `mdef`'s tree, dtype and (if given) shardings.

    With `shardings` (a tree of `jax.sharding.Sharding`s like the params), each device reads only
    its slice, straight from the memory-mapped file; without, each array is put on the default
    device. A tensor the checkpoint lacks, or has in another shape, is an error; so is one Tandem
    would not use (an unsupported variant), except rotary caches and a tied lm_head.
    """
    spec, path = mdef.spec, Path(path)
    dtype = np.dtype(spec.dtype)
    tensors: dict[str, np.ndarray] = {}
    where: dict[str, Path] = {}
    for f in checkpoint_files(path):
        for name, arr in _read_safetensors(f).items():
            tensors[name], where[name] = arr, f
    shapes = mdef.shapes()
    out: dict = {}
    for e in param_map(spec):
        if e.hf_name not in tensors:
            raise HFCheckpointError(f"{path}: the checkpoint has no tensor {e.hf_name!r}, which "
                                    f"{spec.hf_model_type} with this config.json needs")
        raw = tensors.pop(e.hf_name)
        want = tuple(_get(shapes, e.path).shape)
        try:
            view = e.to_tandem(raw)
        except ValueError:  # a reshape that does not fit
            view = raw
        if view.shape != want:
            raise HFCheckpointError(
                f"{where[e.hf_name]}: {e.hf_name} has shape {list(raw.shape)}, but config.json "
                f"implies {list(want)} in Tandem's layout (fix: check that config.json belongs to "
                f"these weights)")
        if shardings is None:
            arr = jax.numpy.asarray(np.asarray(view).astype(dtype))
        else:
            # Each device's callback copies (and casts) only its own index range of the file.
            # The copy keeps the view's memory order (order="K"): forcing C order here would
            # gather transposed layouts element by element in numpy (measured 2-3x slower, see
            # bench/hf_load.py); JAX lays the slice out on the device instead.
            arr = jax.make_array_from_callback(
                want, _get(shardings, e.path),
                lambda idx, v=view: np.array(v[idx], dtype=dtype))
        _set(out, e.path, arr)
    leftover = [n for n in tensors if "rotary_emb" not in n
                and not (spec.tie_embeddings and n == "lm_head.weight")]
    if leftover:
        raise HFCheckpointError(
            f"{path}: the checkpoint has tensors Tandem's {spec.hf_model_type} model does not "
            f"use: {sorted(leftover)[:8]}{' ...' if len(leftover) > 8 else ''} (an unsupported "
            f"variant of the architecture?)")
    return out


def load_hf_model(path: str | Path, *, dtype: Any = "float32",
                  shardings: Params | Callable[[ModelDef], Params] | None = None
                  ) -> tuple[ModelSpec, Params]:
    """(spec, params) of a local HF directory. `shardings` is a tree like the params, or a
    function of the ModelDef that returns one (e.g. `lambda m: param_shardings(m, submesh)`)."""
    spec = load_hf_spec(path, dtype)
    mdef = define_model(spec)
    if callable(shardings):
        shardings = shardings(mdef)
    return spec, load_hf_params(path, mdef, shardings=shardings)


# ---------------------------------------------------------------------------------------------
# Saving


def _shard_plan(entries: list[_Entry], params: Params, max_bytes: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        leaf = _get(params, e.path)
        n = leaf.size * np.dtype(leaf.dtype).itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def _host_leaves(entries: list[_Entry], params: Params) -> Iterator[tuple[str, np.ndarray]]:
    for e in entries:
        # HOST SYNC: one tensor at a time is gathered to the host (never the whole model).
        arr = np.asarray(jax.device_get(_get(params, e.path)))
        yield e.hf_name, np.ascontiguousarray(e.to_hf(arr))


def hf_named_arrays(spec: ModelSpec, params: Params) -> list[tuple[str, np.ndarray]]:
    """(HF tensor name, host array) for every tensor of the HF checkpoint layout of `params`;
    what an HF-format consumer (vLLM's in-place weight load) takes."""
    return list(_host_leaves(param_map(spec), params))


def save_hf_model(path: str | Path, spec: ModelSpec, params: Params, *,
                  source_dir: str | Path | None = None, max_shard_bytes: int = 4 * 1024**3,
                  overwrite: bool = False) -> Path:
    """Writes `params` as a HF directory that `AutoModelForCausalLM.from_pretrained` loads.

    config.json is derived from `spec` (merged over `source_dir`'s, which keeps its token ids);
    weights go into safetensors shards of at most `max_shard_bytes` (a single
    `model.safetensors` when they fit), tokenizer and generation files are copied from
    `source_dir`. The tensors keep the params' dtype. The directory is written beside `path`
    and renamed into place, so a failure leaves no half-written model.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise HFCheckpointError(f"{path} exists and is not empty (fix: choose a new directory "
                                f"or pass overwrite=True)")
    base = read_hf_config(source_dir) if source_dir is not None else None
    cfg = hf_config_from_spec(spec, base)
    entries = param_map(spec)
    leaf_dtypes = {np.dtype(_get(params, e.path).dtype) for e in entries}
    if len(leaf_dtypes) == 1:
        cfg["dtype"] = cfg["torch_dtype"] = leaf_dtypes.pop().name
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plan = _shard_plan(entries, params, max_shard_bytes)
        names = (["model.safetensors"] if len(plan) == 1 else
                 [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
        weight_map, total = {}, 0
        for name, shard in zip(names, plan, strict=True):
            tensors = dict(_host_leaves(shard, params))
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            total += sum(t.nbytes for t in tensors.values())
            weight_map |= dict.fromkeys(tensors, name)
        if len(plan) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(
                weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if source_dir is not None:
            for f in TOKENIZER_FILES:
                if (Path(source_dir) / f).is_file():
                    shutil.copy2(Path(source_dir) / f, tmp / f)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

