"""`tandem plan`: the weight-sync plan of a job on a named TPU topology, before it runs.

    tandem plan examples/llama3-70b-shapes.yaml --topology v5p-256
    tandem plan examples/llama2-7b-shapes.yaml --topology v5p-64 --num-slices 2
    tandem plan model.path=~/models/qwen2.5-0.5b --topology v5e-8

The job's topology section splits the topology's chips into the trainer and sampler meshes, as
`controller.topology.build_meshes` would on the real slice; the model is built abstractly
(`nnx.eval_shape`, no weights allocated), so a 70B plan takes seconds on a laptop. With
model.path the shapes come from the directory's config.json alone (no weights are read).
Devices are `DeviceRef`s (id, slice, host) from the topology description, never real devices.
Times are estimates from published bandwidth figures, printed with the figures and their source.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

from controller.config import ConfigError, JobConfig, load_config

PLAN_EPILOG = """\
examples:
  tandem plan examples/llama2-7b-shapes.yaml --topology v5p-64
  tandem plan examples/llama3-70b-shapes.yaml --topology v5p-256 reshard.dtype=bfloat16
  tandem plan examples/llama2-7b-shapes.yaml --topology v5p-64 --num-slices 2
  tandem plan --topology v6e-16 topology.trainer_devices=12
  tandem plan model.path=~/models/qwen2.5-0.5b --topology v5e-8

Topologies: v5e-N / v5litepod-N and v6e-N (N chips), v5p-N (N TensorCores, N/2 chips).
With --num-slices S the job spans S slices joined over DCN; the trainer takes the first
devices, so an even split of 2 slices puts the trainer on one slice and the sampler on the
other, and every weight byte crosses DCN.
"""


@dataclass(frozen=True)
class PlannedJob:
    """What `tandem plan` computes; printed by `format_plan`."""

    cfg: JobConfig
    spec: Any  # trainer.model.ModelSpec: the model planned
    topology: Any  # reshard.plan.TpuTopology
    trainer: Any  # SubMesh over an AbstractMesh
    sampler: Any
    num_params: int
    src_dtype: str
    plan: Any  # reshard.plan.ReshardPlan
    estimate: Any  # reshard.plan.Estimate
    trainer_bytes_per_chip: int
    sampler_bytes_per_chip: int
    cast_bytes_per_chip: int  # the trainer-side cast copy in flight (0 without a cast)
    # With model.lora: the sync of the adapters alone (after the base's one-time move).
    lora_plan: Any = None
    lora_estimate: Any = None
    lora_params: int = 0


def _abstract_submesh(cfg: JobConfig, name: Literal["trainer", "sampler"], devices: list[Any],
                      mesh_cfg: dict[str, int], rules: dict[str, str | None]) -> Any:
    import numpy as np

    from controller.topology import SubMesh
    from reshard.plan import AbstractMesh

    shape = cfg.topology.mesh_shape(name, len(devices))
    grid = np.empty(len(devices), object)
    grid[:] = devices
    return SubMesh(name, AbstractMesh(grid.reshape(shape), tuple(mesh_cfg)), dict(rules))


def _per_chip_bytes(shapes: Any, shardings: Any, dtype: Any) -> int:
    """Largest total of shard bytes on one device (params only)."""
    from reshard.plan import per_device_bytes

    return max(per_device_bytes(shapes, shardings, dtype=dtype).values(), default=0)


def model_spec(cfg: JobConfig) -> Any:
    """The job's `ModelSpec`: model.path's config.json mapped as a run maps it
    (`trainer.hf.load_hf_spec`; no weights or tokenizer read), else the model.* fields."""
    if cfg.model.path:
        from trainer.hf import load_hf_spec

        return load_hf_spec(cfg.model.path, cfg.model.dtype)
    from controller.data import build_tokenizer
    from trainer.model import ModelSpec

    return ModelSpec.from_config(cfg.model, cfg.model.vocab_size or build_tokenizer(cfg).vocab_size)


def abstract_params(cfg: JobConfig, spec: Any = None) -> tuple[Any, Any]:
    """(shapes, logical axes) of the job's model (`spec`, default `model_spec(cfg)`), as
    ShapeDtypeStructs: nothing allocated.

    The decoder's layers are identical in shape (a sliding-window layer differs only in its
    mask), so one layer is built abstractly (`define_model` with `nnx.eval_shape`) and
    repeated: tracing all 80 layers of a 70B model takes ~30 s, one layer well under a second,
    with the same tree (a test checks this against the full build).
    """
    from trainer.model import define_model

    spec = spec or model_spec(cfg)
    one = dataclasses.replace(spec, num_layers=1, sliding_layers=spec.sliding_layers[:1],
                              attn_query_chunk=None)
    mdef = define_model(one)
    shapes, axes = mdef.shapes(), mdef.logical_axes
    n = spec.num_layers
    shapes = {**shapes, "layers": {i: shapes["layers"][0] for i in range(n)}}
    axes = {**axes, "layers": {i: axes["layers"][0] for i in range(n)}}
    return shapes, axes


def build_plan(cfg: JobConfig, topology: str, num_slices: int = 1) -> PlannedJob:
    """Plans the job's weight sync on `num_slices` x `topology`, from abstract shapes only."""
    import jax

    from reshard.plan import AbstractSharding, estimate_on, parse_topology, plan_reshard

    topo = parse_topology(topology, num_slices)
    devices = topo.devices()
    n_train, _ = cfg.topology.split_counts(len(devices))
    trainer = _abstract_submesh(cfg, "trainer", devices[:n_train], cfg.topology.trainer_mesh,
                                cfg.topology.trainer_rules)
    sampler = _abstract_submesh(cfg, "sampler", devices[n_train:], cfg.topology.sampler_mesh,
                                cfg.topology.sampler_rules)
    spec = model_spec(cfg)
    shapes, logical_axes = abstract_params(cfg, spec)  # abstract: no weights

    def shardings(sub: Any, axes_tree: Any, shapes_tree: Any) -> Any:
        return jax.tree.map(
            lambda axes, s: AbstractSharding(sub.mesh, tuple(sub.spec(axes, s.shape))),
            axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple))

    src, dst = shardings(trainer, logical_axes, shapes), shardings(sampler, logical_axes, shapes)
    dtype = cfg.reshard.dtype
    plan = plan_reshard(shapes, src, dst, dtype=dtype)
    src_dtype = jax.tree.leaves(shapes)[0].dtype
    cast = dtype is not None and jax.numpy.dtype(dtype) != src_dtype
    cast_bytes = _per_chip_bytes(shapes, src, dtype) if cast else 0
    if cast and cfg.reshard.chunk_bytes is not None:
        # A chunk's cast copy is spread over the trainer's chips like the params are.
        cast_bytes = min(cast_bytes, -(-cfg.reshard.chunk_bytes // trainer.size))
    lora_plan = lora_estimate = None
    lora_params = 0
    if cfg.model.lora is not None:
        from trainer.lora import configured, split

        lshapes, laxes = abstract_params(cfg, configured(spec, cfg.model.lora))
        lshapes, laxes = split(lshapes)[1], split(laxes)[1]
        lora_plan = plan_reshard(lshapes, shardings(trainer, laxes, lshapes),
                                 shardings(sampler, laxes, lshapes), dtype=dtype)
        lora_estimate = estimate_on(lora_plan, topo)
        lora_params = sum(s.size for s in jax.tree.leaves(lshapes))
    return PlannedJob(
        lora_plan=lora_plan, lora_estimate=lora_estimate, lora_params=lora_params,
        cfg=cfg, spec=spec, topology=topo, trainer=trainer, sampler=sampler,
        num_params=sum(s.size for s in jax.tree.leaves(shapes)), src_dtype=str(src_dtype),
        plan=plan, estimate=estimate_on(plan, topo),
        trainer_bytes_per_chip=_per_chip_bytes(shapes, src, None),
        sampler_bytes_per_chip=_per_chip_bytes(shapes, dst, dtype),
        cast_bytes_per_chip=cast_bytes)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _count(n: int) -> str:
    """6.74B, 494.03M, 85.38K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _describe_side(sub: Any) -> str:
    ids = [d.id for d in sub.mesh.devices.flat]
    slices = sorted({d.slice for d in sub.mesh.devices.flat})
    shape = ", ".join(f"{k}={v}" for k, v in sub.mesh.shape.items())
    return (f"{sub.name} {len(ids)} chips [{ids[0]}..{ids[-1]}] mesh({shape}), "
            f"slice(s) {','.join(map(str, slices))}")


def format_plan(p: PlannedJob, *, max_rows: int = 40) -> str:
    """The human-readable plan: split, per-leaf summary, totals, estimate, memory."""
    plan, est, topo = p.plan, p.estimate, p.topology
    moved = p.cfg.reshard.dtype or p.src_dtype
    source = (f"model.path={p.cfg.model.path} ({p.spec.hf_model_type}, shapes from its "
              f"config.json)" if p.cfg.model.path else "the built-in decoder (model.* fields)")
    lines = [
        f"tandem plan: {topo.describe()}",
        f"model: {_count(p.num_params)} params ({p.num_params:,}), {source}, "
        f"{p.spec.num_layers} layers, d={p.spec.hidden_size}; trainer holds {p.src_dtype}, "
        f"sync sends {moved}",
        f"mesh split: {_describe_side(p.trainer)} | {_describe_side(p.sampler)}",
        "",
    ]
    # Per-leaf summary: repeated layers collapse into one row with a count.
    groups: dict[tuple, list] = {}
    for leaf in plan.leaves:
        name = re.sub(r"\['layers'\]\[\d+\]", "['layers'][*]", leaf.path)
        key = (name, leaf.shape, leaf.src_layout, leaf.dst_layout)
        groups.setdefault(key, []).append(leaf)
    rows = []
    for (name, shape, s, d), leaves in list(groups.items())[:max_rows]:
        mb = [sum(f(x) for x in leaves) / 1e6 for f in (
            lambda x: x.moved_bytes, lambda x: x.bytes_by_kind("ici"),
            lambda x: x.bytes_by_kind("dcn"))]
        rows.append((name, str(len(leaves)), str(list(shape)), s, d,
                     *(f"{v:.1f}" for v in mb)))
    head = ("leaf", "n", "shape", "trainer layout", "sampler layout", "moved MB", "ICI MB",
            "DCN MB")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for j, r in enumerate([head, *rows]):
        lines.append("  ".join(c.ljust(w) if i in (0, 2, 3, 4) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
        if j == 0:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    if len(groups) > max_rows:
        lines.append(f"... {len(groups) - max_rows} more leaf groups (--max-rows)")
    lines.append("")
    lines.append(
        f"bytes: arrays {_gb(plan.array_bytes)}; moved {_gb(plan.moved_bytes)} "
        f"(ICI {_gb(plan.ici_bytes)}, DCN {_gb(plan.dcn_bytes)}, same-device "
        f"{_gb(plan.local_bytes)}); replicated targets count once per copy")
    busiest = plan.busiest_link()
    if busiest is not None:
        (a, b), n = busiest
        lines.append(f"links: {len(plan.link_bytes())} device pairs; busiest chip {a} -> chip "
                     f"{b}: {_gb(n)}")
    lines.append(
        f"estimated sync time (ESTIMATE from published bandwidths, not a measurement): "
        f"{est.seconds:.3f} s  [ICI {est.ici_seconds:.3f} s at "
        f"{est.ici_gbytes_s_per_chip_dir:.0f} GB/s per chip per direction; DCN "
        f"{est.dcn_seconds:.3f} s at {est.dcn_gbytes_s_per_host:.1f} GB/s per host]")
    lines.append(f"  bottleneck: {est.bottleneck}")

    lines.append(f"  figures: {est.source}")
    lines.append("  model: each chip's ICI traffic spread over all its ports, no multi-hop "
                 "contention, ICI and DCN overlapped; a lower bound")
    if p.lora_plan is not None:
        lc, lp, le = p.cfg.model.lora, p.lora_plan, p.lora_estimate
        lines.append(
            f"LoRA (rank {lc.rank} on {', '.join(lc.targets)}): {_count(p.lora_params)} adapter "
            f"params; after the base's one move at start, each sync moves "
            f"{lp.moved_bytes / 1e6:.2f} MB (ICI {lp.ici_bytes / 1e6:.2f} MB, DCN "
            f"{lp.dcn_bytes / 1e6:.2f} MB), estimated {le.seconds * 1e3:.3f} ms, against "
            f"{plan.moved_bytes / 1e6:.2f} MB and {est.seconds * 1e3:.1f} ms for full fine-tuning "
            f"({plan.moved_bytes / max(lp.moved_bytes, 1):.0f}x fewer bytes)")
    hbm = topo.spec.hbm_gib * 2**30
    samp_peak = 2 * p.sampler_bytes_per_chip  # old weights serve until the new ones land
    train_peak = p.trainer_bytes_per_chip + p.cast_bytes_per_chip
    lines.append(
        f"peak memory per chip (params only; optimizer state, KV cache and activations not "
        f"included): trainer {_gb(train_peak)} ({_gb(p.trainer_bytes_per_chip)} params"
        f"{f' + {_gb(p.cast_bytes_per_chip)} cast copy' if p.cast_bytes_per_chip else ''}), "
        f"sampler {_gb(samp_peak)} (old + new weights, {_gb(p.sampler_bytes_per_chip)} each) "
        f"of {topo.spec.hbm_gib:.0f} GiB HBM")
    for side, peak in (("trainer", train_peak), ("sampler", samp_peak)):
        if peak > hbm:
            lines.append(f"  WARNING: the {side} side needs {_gb(peak)} per chip, more than "
                         f"the {topo.spec.hbm_gib:.0f} GiB of HBM (fix: more chips on that "
                         f"side, reshard.dtype=bfloat16, or a larger topology)")
    return "\n".join(lines)


def cmd_plan(ns: argparse.Namespace) -> int:
    from controller.cli.args import fail, input_errors, split_args

    config_path, overrides = split_args(ns.args)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        return fail(e)
    import jax

    # The plan needs no accelerator: keep JAX on the CPU (one device, nothing allocated).
    with contextlib.suppress(RuntimeError):  # already started: fine, nothing is allocated
        jax.config.update("jax_platforms", "cpu")
    from reshard.plan import PlanError

    try:
        planned = build_plan(cfg, ns.topology, ns.num_slices)
    except (PlanError, *input_errors()) as e:  # a config error, or model.path's config.json
        return fail(e)
    print(format_plan(planned, max_rows=ns.max_rows))
    return 0


def add_plan_parser(sub: Any) -> None:
    """Registers `tandem plan` on the CLI's subparsers."""
    p = sub.add_parser(
        "plan", help="print the weight-sync plan and its estimated time on a TPU topology",
        description="Plan the trainer -> sampler weight sync of a job on a named TPU topology, "
        "from abstract shapes (no weights allocated). Arguments: an optional YAML config, then "
        "section.field=value overrides.",
        epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="[config.yaml] [key=value]")
    p.add_argument("--topology", required=True,
                   help="a named TPU slice: v5e-N, v5p-N, v6e-N (e.g. v5p-64)")
    p.add_argument("--num-slices", type=int, default=1,
                   help="slices of that topology joined over DCN (default 1)")
    p.add_argument("--max-rows", type=int, default=40, help="leaf groups to print")
    p.set_defaults(func=cmd_plan)
