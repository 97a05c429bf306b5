"""Tandem's side of bench/memory.py: the GRPO update alone, on fixed rows, through the Trainer.

    python bench/peers/tandem_memory_runner.py SPEC.json [key.sub=value ...]

Builds the model, optimizer and `Trainer` as controller/api.py does (so the same defaults
apply: the layered update for a model of this size, the trainer's heap options), but on one
device: a one-device trainer mesh, no sampler, no sampling. Each step is `trainer.update` on
the same `TrainBatch` (the spec's token ids, every completion exactly T tokens, fixed
advantages): the reference log-probs, the policy's forward and backward, one AdamW step.
`warmup_steps` untimed steps (the first compiles), then `timed_steps` timed ones, each waited
for. Extra `key.sub=value` overrides go to the config (e.g. `trainer.logits_chunk=4096`,
`trainer.remat=block`); a `trainer.*` override this build has no field for is reported as
unavailable, not dropped.

Prints one JSON line. Run with `JAX_PLATFORMS=cpu` for the CPU numbers (one CPU device); on an
accelerator it also reports the device's peak memory in use.
"""

from __future__ import annotations

import inspect
import json
import resource
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from bench.peers.overrides import model_overrides, update_overrides  # noqa: E402
from controller.config import ConfigError, JobConfig, load_config  # noqa: E402

GIB = 1 << 30


def job_overrides(spec: dict) -> list[str]:
    """The spec as Tandem config overrides (the caller's extra overrides come after these)."""
    return [*model_overrides(spec["model"]), f"model.init_seed={spec['seed']}",
            "sampling.temperature=1.0", *update_overrides(spec)]


def rss_gib() -> float:
    """This process's resident set now (VmRSS), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def unavailable(extra: list[str], why: str) -> int:
    print(json.dumps({"framework": "tandem", "unavailable": why, "extra_overrides": extra}))
    return 0


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    extra = sys.argv[2:]
    # A `trainer.*` override needs the config's trainer section; without it the cell is n/a.
    wants_trainer = [x for x in extra if x.startswith("trainer.")]
    if wants_trainer and "trainer" not in JobConfig.model_fields:
        return unavailable(extra, f"this build has no trainer config section ({wants_trainer})")
    try:
        cfg = load_config(overrides=job_overrides(spec) + extra)
    except ConfigError as e:
        return unavailable(extra, f"overrides rejected: {e}")

    import jax
    import numpy as np
    from jax.sharding import Mesh

    from controller.topology import SubMesh
    from trainer.model import ModelSpec, define_model, init_params, param_count
    from trainer.optim import build_optimizer, build_schedule
    from trainer.trainer import TrainBatch, Trainer

    # THE TRAINER, as controller/api.py builds it, on a one-device trainer mesh.
    device = jax.devices()[0]
    topo = cfg.topology
    mesh = Mesh(np.array([device]).reshape(topo.mesh_shape("trainer", 1)),
                tuple(topo.trainer_mesh))
    submesh = SubMesh("trainer", mesh, dict(topo.trainer_rules))
    spec_m = ModelSpec.from_config(cfg.model, cfg.model.vocab_size)
    mdef = define_model(spec_m)
    params = init_params(spec_m, cfg.model.init_seed)
    num_params = param_count(params)
    schedule = build_schedule(cfg.optimizer, cfg.run.steps * cfg.algorithm.num_iterations
                              * cfg.algorithm.num_minibatches)
    # The trainer section goes to the Trainer as api.py passes it (`memory=cfg.trainer`), or
    # field by field where the constructor takes them by name, so this runner works with every
    # build that has the section, and without it.
    accepted = inspect.signature(Trainer.__init__).parameters
    trainer_kwargs: dict = {}
    if "trainer" in JobConfig.model_fields:
        if "memory" in accepted:
            trainer_kwargs["memory"] = cfg.trainer
        else:
            trainer_kwargs = {k: v for k, v in cfg.trainer.model_dump().items() if k in accepted}
    passed = set(cfg.trainer.model_dump()) if "memory" in trainer_kwargs else set(trainer_kwargs)
    asked = {x.split("=", 1)[0].split(".", 1)[1] for x in wants_trainer}
    if asked - passed:
        return unavailable(extra, f"Trainer() takes no {sorted(asked - passed)} in this build")
    trainer = Trainer(mdef, params, build_optimizer(cfg.optimizer, schedule), submesh,
                      cfg.algorithm, cfg.sampling.temperature, lr_schedule=schedule,
                      is_cap=cfg.schedule.is_cap, **trainer_kwargs)
    del params  # the trainer holds its own copy on the mesh

    # THE BATCH: the spec's ids, B = prompts x G rows, every completion exactly T tokens.
    prompt_BxP = np.asarray(spec["prompt_ids"], np.int32)
    completion_BxT = np.asarray(spec["completion_ids"], np.int32)
    rows, t = completion_BxT.shape
    batch = TrainBatch(prompt_BxP, np.ones(prompt_BxP.shape, bool), completion_BxT,
                       np.ones((rows, t), bool), np.asarray(spec["advantages"], np.float32),
                       np.zeros((rows, t), np.float32), group=spec["group_size"])
    setup_s = time.perf_counter() - T_START
    rss_setup = rss_gib()

    # What the trainer plans for this shape (chunk, checkpointing), where it can say.
    estimate = getattr(trainer, "memory_estimate", None)
    plan = None
    if estimate is not None:
        est = estimate(rows, prompt_BxP.shape[1], t)
        plan = {"logits_chunk": est.chunk, "remat": est.remat,
                "estimate_gib": est.total / GIB, "estimate": est.describe()}

    # THE STEPS: each waits for the new state and the metrics (a host sync per step).
    steps = []
    for i in range(spec["warmup_steps"] + spec["timed_steps"]):
        t0 = time.perf_counter()
        try:
            aux = trainer.update(batch)
        except ConfigError as e:  # the trainer's own memory check refuses this shape
            print(json.dumps({"framework": "tandem", "refused": str(e), "memory_plan": plan}))
            return 0
        jax.block_until_ready((trainer.state, aux))
        steps.append({"step_s": time.perf_counter() - t0, "warmup": i < spec["warmup_steps"],
                      "loss": float(aux["loss/total"]), "kl": float(aux.get("kl/mean", np.nan))})

    device_peak = None
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            device_peak = stats["peak_bytes_in_use"] / GIB
    print(json.dumps({
        "framework": "tandem",
        "setup_s": setup_s,
        "steps": steps,
        "rss_after_setup_gib": rss_setup,
        "rss_peak_self_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "device_peak_gib": device_peak,
        "settings": {
            "params": num_params,
            "device": str(device),
            "platform": device.platform,
            "rows": rows,
            "group_size": spec["group_size"],
            "prompt_tokens": int(prompt_BxP.shape[1]),
            "completion_tokens": int(t),
            "vocab_size": spec_m.vocab_size,
            "beta": cfg.algorithm.beta,
            "epsilon": cfg.algorithm.epsilon,
            "loss_aggregation": cfg.algorithm.loss_aggregation,
            "learning_rate": cfg.optimizer.learning_rate,
            "max_grad_norm": cfg.optimizer.max_grad_norm,
            "optimizer_steps_per_batch": trainer.optimizer_steps_per_update,
            "layered_update": trainer.uses_layered_update(),
            "reference_model": trainer.ref_params is not None,
            "dtype": cfg.model.dtype,
            "trainer_config": cfg.trainer.model_dump() if "trainer" in JobConfig.model_fields
            else None,
            "memory_plan": plan,
            "extra_overrides": extra,
            "jax": jax.__version__,
        },
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
