"""Builds the sampler that `sampling.backend` names, behind the one `Sampler` interface."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from controller.config import ConfigError, SamplingConfig
from sampler.base import Sampler


def build_sampler(cfg: SamplingConfig, mdef: Any, submesh: Any, *, pad_id: int,
                  stop_ids: tuple[int, ...], param_dtype: Any = None,
                  hf_model_dir: str | None = None,
                  to_hf: Callable[[Any], Any] | None = None) -> Sampler:
    """The JAX sampler on `submesh`, or vLLM serving `hf_model_dir` (weights pushed via to_hf).

    Raises ImportError (with the pip command) when backend=vllm and vLLM is missing, and a
    ConfigError when backend=vllm has no Hugging Face model directory to serve.
    """
    if cfg.backend == "jax":
        from sampler.jax_sampler import JaxSampler

        return JaxSampler(mdef, submesh, cfg, pad_id=pad_id, stop_ids=stop_ids,
                          param_dtype=param_dtype)

    import jax

    from sampler.vllm_backend import VllmSampler, import_vllm

    import_vllm()  # the install hint comes first: it is the likelier problem
    if hf_model_dir is None or to_hf is None:
        raise ConfigError(
            "sampling.backend=vllm: vLLM serves a Hugging Face model directory and takes new "
            "weights by HF tensor name, and this job has neither (fix: start from an HF "
            "checkpoint with its export, or use sampling.backend=jax)"
        )
    expected = jax.tree.map(lambda s: (s.shape, s.dtype), mdef.shapes())
    return VllmSampler(hf_model_dir, cfg, pad_id=pad_id, stop_ids=stop_ids, expected=expected,
                       to_hf=to_hf)
