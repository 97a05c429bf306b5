"""The Tandem config overrides the runners share: the model's shape and the update's settings,
from a bench spec (bench/grpo_step.py's job dict, or bench/memory.py's)."""

from __future__ import annotations


def model_overrides(m: dict) -> list[str]:
    """The model's fields (a Qwen2-layout decoder, fp32)."""
    out = [f"model.{k}={m[k]}" for k in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                         "num_kv_heads", "mlp_dim", "rope_theta", "norm_eps")]
    if m.get("head_dim") is not None:
        out.append(f"model.head_dim={m['head_dim']}")
    return [*out, f"model.tie_embeddings={str(m['tie_embeddings']).lower()}",
            f"model.qkv_bias={str(m['qkv_bias']).lower()}", "model.dtype=float32"]


def update_overrides(spec: dict) -> list[str]:
    """β, ε, the token-mean loss and one AdamW step per batch, for warmup + timed steps."""
    return [
        f"sampling.group_size={spec['group_size']}",
        f"algorithm.beta={spec['beta']}",
        f"algorithm.epsilon={spec['epsilon']}",
        "algorithm.loss_aggregation=token-mean",
        f"optimizer.learning_rate={spec['lr']}",
        f"optimizer.b1={spec['adam_b1']}",
        f"optimizer.b2={spec['adam_b2']}",
        f"optimizer.weight_decay={spec['weight_decay']}",
        f"optimizer.max_grad_norm={spec['max_grad_norm']}",
        "optimizer.warmup_steps=0",
        f"run.steps={spec['warmup_steps'] + spec['timed_steps']}",
    ]
