"""Reshard plans: index maps, byte totals, ICI vs DCN, the estimate, and `tandem plan`."""

import jax
import numpy as np
import pytest
from helpers.hf_fixtures import FAMILIES
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from reshard.plan import (
    AbstractMesh,
    AbstractSharding,
    DeviceRef,
    PlanError,
    device_ref,
    estimate_time,
    parse_topology,
    plan_reshard,
)


def _abstract(devices, shape, names):
    grid = np.empty(len(devices), object)
    grid[:] = devices
    return AbstractMesh(grid.reshape(shape), names)


@pytest.mark.parametrize("mesh_shape,names,spec,shape", [
    ((4,), ("f",), ("f", None), (8, 12)),
    ((2, 3), ("a", "b"), (("a", "b"), None), (12, 6)),
    ((2, 3), ("a", "b"), (("b", "a"), None), (12, 6)),
    ((2, 3), ("a", "b"), ("b", "a"), (12, 6)),
    ((2, 2), ("a", "b"), (None, "a"), (12, 6)),
    ((2, 2), ("a", "b"), (), (5, 3)),
])
def test_abstract_index_map_equals_jax(mesh_shape, names, spec, shape, eight_devices):
    n = int(np.prod(mesh_shape))
    mesh = Mesh(np.array(eight_devices[:n]).reshape(mesh_shape), names)
    want = NamedSharding(mesh, P(*spec)).devices_indices_map(shape)
    amesh = _abstract([device_ref(d) for d in eight_devices[:n]], mesh_shape, names)
    got = AbstractSharding(amesh, spec).devices_indices_map(shape)
    for d in mesh.devices.flat:
        norm = [s.indices(k) for s, k in zip(want[d], shape, strict=True)]
        assert norm == [s.indices(k) for s, k in zip(got[device_ref(d)], shape, strict=True)]


def test_abstract_sharding_rejects_uneven_like_jax():
    amesh = _abstract([DeviceRef(i) for i in range(3)], (3,), ("t",))
    with pytest.raises(PlanError, match="does not divide 10"):
        AbstractSharding(amesh, ("t",)).devices_indices_map((10, 4))


def _fsdp_tp(eight_devices):
    t = Mesh(np.array(eight_devices[:4]), ("fsdp",))
    s = Mesh(np.array(eight_devices[4:]), ("tp",))
    tree = {"w": jax.ShapeDtypeStruct((16, 16), np.float32),
            "n": jax.ShapeDtypeStruct((16,), np.float32),
            "i": jax.ShapeDtypeStruct((8, 3), np.int32)}
    src = {"w": NamedSharding(t, P("fsdp")), "n": NamedSharding(t, P()),
           "i": NamedSharding(t, P("fsdp"))}
    dst = {"w": NamedSharding(s, P(None, "tp")), "n": NamedSharding(s, P()),
           "i": NamedSharding(s, P())}
    return tree, src, dst


def test_plan_bytes_add_up_to_the_arrays(eight_devices):
    tree, src, dst = _fsdp_tp(eight_devices)
    plan = plan_reshard(tree, src, dst)
    assert plan.array_bytes == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    by = {p.path: p for p in plan.leaves}
    # Fully sharded target: every byte moves once. 16x16 fp32 FSDP rows -> TP columns: each of
    # the 4 targets gets a 4x4 block (64 B) from each of the 4 sources.
    w = by["['w']"]
    assert w.moved_bytes == w.array_bytes == 1024
    assert sorted({t.nbytes for t in w.transfers}) == [64] and len(w.transfers) == 16
    # Replicated targets receive one copy each: 4 x the array.
    assert by["['n']"].moved_bytes == 4 * 64 and by["['i']"].moved_bytes == 4 * 96
    # The replicated source spreads the work: each of the 4 holders sends one copy.
    assert sorted(plan.per_device_bytes("src").values()) == [256 + 64 + 96] * 4
    # One slice: everything rides ICI.
    assert plan.ici_bytes == plan.moved_bytes and plan.dcn_bytes == 0
    assert plan.busiest_link()[1] == max(plan.link_bytes().values())
    # The cast moves floating leaves in bf16, ints as they are.
    half = plan_reshard(tree, src, dst, dtype="bfloat16")
    assert half.array_bytes == 512 + 32 + 96


def test_plan_from_real_and_abstract_shardings_agree(eight_devices):
    tree, src, dst = _fsdp_tp(eight_devices)
    real = plan_reshard(tree, src, dst)

    def abstract(sh):
        m = sh.mesh
        am = _abstract([device_ref(d) for d in m.devices.flat], m.devices.shape, m.axis_names)
        return AbstractSharding(am, tuple(sh.spec))

    fake = plan_reshard(tree, jax.tree.map(abstract, src), jax.tree.map(abstract, dst))
    assert [p.transfers for p in real.leaves] == [p.transfers for p in fake.leaves]


def test_ici_dcn_and_local_classification():
    topo = parse_topology("v5p-16", num_slices=2)  # 8 chips per slice
    dev = topo.devices()
    assert [d.slice for d in dev] == [0] * 8 + [1] * 8
    tree = {"w": jax.ShapeDtypeStruct((8, 8), np.float32)}

    def sh(devs, spec):
        return {"w": AbstractSharding(_abstract(devs, (len(devs),), ("x",)), spec)}

    across = plan_reshard(tree, sh(dev[:8], ("x",)), sh(dev[8:], (None, "x")))
    assert across.dcn_bytes == 256 and across.ici_bytes == 0
    within = plan_reshard(tree, sh(dev[:4], ("x",)), sh(dev[4:8], (None, "x")))
    assert within.ici_bytes == 256 and within.dcn_bytes == 0
    same = plan_reshard(tree, sh(dev[:4], ("x",)), sh(dev[:4], ("x",)))
    assert same.local_bytes == 256 and same.moved_bytes == 256 and not same.link_bytes()
    # A source replicated on both slices serves each target from the target's own slice.
    both = plan_reshard(tree, sh(dev[4:12], ()), sh(dev[12:], ("x",)))
    assert both.dcn_bytes == 0 and both.ici_bytes == 256


def test_estimate_is_busiest_endpoint_over_bandwidth_and_monotone():
    topo = parse_topology("v5p-16", num_slices=2)
    dev = topo.devices()
    tree = {"w": jax.ShapeDtypeStruct((1000, 1000), np.float32)}  # 4e6 bytes
    src = {"w": AbstractSharding(_abstract(dev[:4], (4,), ("x",)), ("x",))}  # host 0, slice 0
    dst = {"w": AbstractSharding(_abstract(dev[8:12], (4,), ("x",)), (None, "x"))}  # slice 1
    plan = plan_reshard(tree, src, dst)
    # Host 0 sends all 4e6 bytes over DCN: at 1 GB/s per host that is 4 ms.
    est = estimate_time(plan, ici_gbytes_s_per_chip_dir=100.0, dcn_gbytes_s_per_host=1.0)
    assert est.dcn_seconds == pytest.approx(4e-3) and est.seconds == est.dcn_seconds
    assert est.ici_seconds == 0 and "DCN" in est.bottleneck
    times = [estimate_time(plan, ici_gbytes_s_per_chip_dir=100.0, dcn_gbytes_s_per_host=b).seconds
             for b in (0.5, 1.0, 2.0, 8.0, 64.0)]
    assert times == sorted(times, reverse=True) and times[0] > times[-1]
    # Within a slice: each chip sends 1e6 bytes; at 10 GB/s per direction that is 0.1 ms.
    ici = plan_reshard(tree, src, {"w": AbstractSharding(_abstract(dev[4:8], (4,), ("x",)),
                                                          (None, "x"))})
    t = [estimate_time(ici, ici_gbytes_s_per_chip_dir=b, dcn_gbytes_s_per_host=1.0).seconds
         for b in (1.0, 10.0, 100.0)]
    assert t[1] == pytest.approx(1e-4) and t[0] > t[1] > t[2]
    with pytest.raises(PlanError, match="must be > 0"):
        estimate_time(plan, ici_gbytes_s_per_chip_dir=0.0, dcn_gbytes_s_per_host=1.0)


def test_parse_topology_names():
    v5p = parse_topology("v5p-64")
    assert (v5p.num_chips, v5p.hosts_per_slice, v5p.spec.ici_gbytes_s) == (32, 8, 1200.0)
    assert parse_topology("v5litepod-16").num_chips == 16
    two = parse_topology("v6e-16", num_slices=2)
    assert two.num_chips == 32 and {d.host for d in two.devices()} == {0, 1, 2, 3}
    with pytest.raises(PlanError, match="--topology='v9x-8'"):
        parse_topology("v9x-8")
    with pytest.raises(PlanError, match="multiple of 2"):
        parse_topology("v5p-7")


# -- tandem plan ---------------------------------------------------------------------------------


def test_abstract_params_repeat_one_layer_exactly():
    from controller.cli.plan import abstract_params
    from controller.config import JobConfig, ModelConfig
    from trainer.model import ModelSpec, define_model

    cfg = JobConfig(model=ModelConfig(num_layers=3, hidden_size=32, num_heads=4,
                                      num_kv_heads=2, mlp_dim=64, vocab_size=50,
                                      tie_embeddings=False, qkv_bias=True))
    shapes, axes = abstract_params(cfg)
    full = define_model(ModelSpec.from_config(cfg.model, 50))
    assert jax.tree.structure(shapes) == jax.tree.structure(full.shapes())
    assert jax.tree.leaves(shapes) == jax.tree.leaves(full.shapes())
    assert axes == full.logical_axes


def test_tandem_plan_prints_split_bytes_and_estimate(capsys):
    from controller.cli import main

    tiny = ["model.hidden_size=64", "model.num_layers=2", "model.vocab_size=128",
            "model.mlp_dim=128"]
    assert main(["plan", "--topology", "v5p-16", *tiny]) == 0
    out = capsys.readouterr().out
    assert "mesh split: trainer 4 chips [0..3] mesh(fsdp=4)" in out
    assert "sampler 4 chips [4..7] mesh(dp=1, tp=4)" in out
    assert "ESTIMATE" in out and "cloud.google.com/tpu/docs/v5p" in out
    assert "DCN 0.00 GB" in out
    # Two slices split evenly: every byte crosses DCN.
    assert main(["plan", "--topology", "v5p-16", "--num-slices", "2", *tiny]) == 0
    out = capsys.readouterr().out
    assert "ICI 0.00 GB" in out and "bottleneck: DCN" in out
    assert main(["plan", "--topology", "tpu-3"]) == 2
    assert "--topology='tpu-3'" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_tandem_plan_reads_model_path_config_without_weights(tmp_path, capsys, family):
    """With model.path, the plan is of that model: its parameter count is the checkpoint's,
    from config.json alone (the weights and tokenizer are deleted first, so none is read)."""
    pytest.importorskip("transformers")
    import math

    from helpers.hf_fixtures import write_tiny_hf_model
    from safetensors import safe_open

    from controller.cli import main

    model = write_tiny_hf_model(family, tmp_path / family)
    with safe_open(str(model / "model.safetensors"), "np") as f:
        names = f.keys()  # a safetensors handle is not iterable
        real = sum(math.prod(f.get_slice(k).get_shape()) for k in names)
    for p in model.iterdir():
        if p.name != "config.json":
            p.unlink()
    assert main(["plan", "--topology", "v5e-8", f"model.path={model}"]) == 0
    out = capsys.readouterr().out
    model_type = "gemma3_text" if family == "gemma3" else family
    assert (f"params ({real:,}), model.path={model} ({model_type}, shapes from its "
            f"config.json), 2 layers, d=32;") in out


def test_tandem_plan_puts_lora_sync_next_to_full_fine_tuning(capsys):
    # Qwen2.5-0.5B's shapes with rank-8 adapters on q and v: the adapters' count is
    # 24 layers x 8 x ((896 + 896) for q + (896 + 128) for v), and each sync moves a small
    # fraction of the full model's bytes.
    from controller.cli import main
    from controller.cli.plan import build_plan
    from controller.config import load_config

    qwen = ["model.hidden_size=896", "model.num_layers=24", "model.num_heads=14",
            "model.num_kv_heads=2", "model.mlp_dim=4864", "model.vocab_size=151936",
            "model.lora={rank: 8, targets: [q, v]}"]
    planned = build_plan(load_config(overrides=qwen), "v5e-16")
    assert planned.lora_params == 24 * 8 * ((896 + 896) + (896 + 128))
    assert planned.lora_plan.moved_bytes * 100 < planned.plan.moved_bytes
    assert planned.lora_estimate.seconds < planned.estimate.seconds / 100
    assert main(["plan", "--topology", "v5e-16", *qwen]) == 0
    out = capsys.readouterr().out
    assert "LoRA (rank 8 on q, v): 540.67K adapter params" in out
    assert "for full fine-tuning" in out and "x fewer bytes" in out
    assert main(["plan", "--topology", "v5e-16", *qwen[:-1]]) == 0
    assert "LoRA" not in capsys.readouterr().out  # full fine-tuning: no LoRA line
