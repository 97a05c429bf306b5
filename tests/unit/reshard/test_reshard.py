"""Weight-sync transfers: placement and exact values for every layout pair, cast, chunking,
donation rules, and the Pathways switch (with a fake IFRT transfer, no Pathways server here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import reshard.transfer as transfer_mod
from reshard.transfer import Resharder, TransferError, staging_sharding, tree_bytes


def _mesh(devices, shape, names):
    return Mesh(np.array(devices).reshape(shape), names)


def _tree(src_sh):
    """Distinct values everywhere (arange), so a misplaced block cannot hide."""
    out = {}
    for k, (shape, dtype, sh) in src_sh.items():
        n = int(np.prod(shape))
        x = (np.arange(n) * 0.37 - 5).astype(dtype).reshape(shape)
        out[k] = jax.device_put(x, sh)
    return out


def _cases(d):
    t4, s4 = _mesh(d[:4], (4,), ("fsdp",)), _mesh(d[4:], (4,), ("tp",))
    t2, s6 = _mesh(d[:2], (2,), ("fsdp",)), _mesh(d[2:], (6,), ("tp",))
    t3 = _mesh(d[:3], (3,), ("fsdp",))
    s23 = _mesh(d[3:], (1, 5), ("dp", "tp"))
    grid = _mesh(d[2:], (2, 3), ("dp", "tp"))
    return {
        "fsdp->tp": ({"w": ((8, 12), np.float32, NamedSharding(t4, P("fsdp", None))),
                      "o": ((12, 8), np.float32, NamedSharding(t4, P(None, "fsdp")))},
                     {"w": NamedSharding(s4, P(None, "tp")), "o": NamedSharding(s4, P("tp"))}),
        "tp->fsdp": ({"w": ((8, 12), np.float32, NamedSharding(s4, P(None, "tp")))},
                     {"w": NamedSharding(t4, P("fsdp", None))}),
        "replicated->sharded": ({"w": ((8, 4), np.float32, NamedSharding(t4, P()))},
                                {"w": NamedSharding(s4, P("tp", None))}),
        "sharded->replicated": ({"w": ((8, 4), np.float32, NamedSharding(t4, P("fsdp")))},
                                {"w": NamedSharding(s4, P())}),
        # 2 -> 6 devices; the target blocks (2 columns) straddle the source blocks (6 rows).
        "2->6": ({"w": ((12, 12), np.float32, NamedSharding(t2, P("fsdp", None))),
                  "b": ((6,), np.float32, NamedSharding(t2, P("fsdp")))},
                 {"w": NamedSharding(s6, P(None, "tp")), "b": NamedSharding(s6, P("tp"))}),
        # Uneven: 3-way source rows (10 % 3 != 0 is replicated), 5-way target columns.
        "uneven 3->5": ({"w": ((9, 10), np.float32, NamedSharding(t3, P("fsdp", None))),
                         "v": ((10, 7), np.float32, NamedSharding(t3, P()))},
                        {"w": NamedSharding(s23, P("dp", "tp")),
                         "v": NamedSharding(s23, P("tp", None))}),
        # 2-d target mesh, multi-axis spec, int leaf and scalar leaf.
        "2d mesh + int + scalar": (
            {"w": ((12, 6), np.float32, NamedSharding(t2, P(None, "fsdp"))),
             "i": ((6, 4), np.int32, NamedSharding(t2, P("fsdp"))),
             "s": ((), np.float32, NamedSharding(t2, P()))},
            {"w": NamedSharding(grid, P(("dp", "tp"), None)),
             "i": NamedSharding(grid, P("tp", "dp")), "s": NamedSharding(grid, P())}),
    }


CASES = list(_cases([f"d{i}" for i in range(8)]).keys())


@pytest.mark.parametrize("method", ["host_copy", "device_put"])
@pytest.mark.parametrize("case", CASES)
def test_transfer_places_every_leaf_and_keeps_values(case, method, eight_devices):
    src_sh, dst_sh = _cases(eight_devices)[case]
    tree = _tree(src_sh)
    out, stats = Resharder(method=method).transfer(tree, dst_sh)
    for k in tree:
        assert out[k].sharding == dst_sh[k], k
        assert out[k].dtype == tree[k].dtype
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(tree[k]))
        # Every target shard holds exactly its slice of the array.
        for shard in out[k].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data),
                                          np.asarray(tree[k])[shard.index])
    assert stats.method == method and stats.bytes == tree_bytes(out)
    # The caller's tree is untouched (never donated).
    np.testing.assert_array_equal(np.asarray(tree[next(iter(tree))]),
                                  np.asarray(out[next(iter(tree))]))


@pytest.mark.parametrize("method", ["host_copy", "device_put"])
def test_bf16_cast_is_exact_and_leaves_ints_alone(method, eight_devices):
    src_sh, dst_sh = _cases(eight_devices)["2d mesh + int + scalar"]
    tree = _tree(src_sh)
    out, stats = Resharder(dtype="bfloat16", method=method).transfer(tree, dst_sh)
    assert out["w"].dtype == jnp.bfloat16 and out["s"].dtype == jnp.bfloat16
    assert out["i"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out["w"]),
                                  np.asarray(tree["w"]).astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(out["i"]), np.asarray(tree["i"]))
    assert out["w"].sharding == dst_sh["w"]
    # 12*6 + 1 floats now 2 bytes each, 24 int32 unchanged.
    assert stats.bytes == (12 * 6 + 1) * 2 + 6 * 4 * 4
    # The cast copy (bf16 w and s) is the only temporary of host_copy.
    if method == "host_copy":
        assert stats.peak_extra_bytes == (12 * 6 + 1) * 2


def test_chunking_bounds_the_temporaries_and_reports_the_peak(eight_devices):
    d = eight_devices
    t4, s4 = _mesh(d[:4], (4,), ("fsdp",)), _mesh(d[4:], (4,), ("tp",))
    src = {f"w{i}": ((8, 16), np.float32, NamedSharding(t4, P("fsdp"))) for i in range(6)}
    dst = {f"w{i}": NamedSharding(s4, P(None, "tp")) for i in range(6)}
    tree = _tree(src)
    whole, s_whole = Resharder(dtype="bfloat16").transfer(tree, dst)
    # Each leaf moves 8*16*2 = 256 bytes in bf16; a 600-byte budget holds 2 leaves per chunk.
    chunked, s_chunk = Resharder(dtype="bfloat16", chunk_bytes=600).transfer(tree, dst)
    assert (s_whole.chunks, s_chunk.chunks) == (1, 3)
    assert s_whole.peak_extra_bytes == 6 * 256
    assert s_chunk.peak_extra_bytes == 2 * 256 <= 600
    for k in tree:
        np.testing.assert_array_equal(np.asarray(chunked[k]), np.asarray(whole[k]))
        assert chunked[k].sharding == dst[k]
    # A leaf larger than the budget is a chunk of its own.
    _, s_tiny = Resharder(dtype="bfloat16", chunk_bytes=1).transfer(tree, dst)
    assert s_tiny.chunks == 6 and s_tiny.peak_extra_bytes == 256


def test_never_donates_on_cpu(eight_devices):
    src_sh, dst_sh = _cases(eight_devices)["fsdp->tp"]
    tree = _tree(src_sh)
    for method in ("host_copy", "device_put"):
        out, stats = Resharder(dtype="bfloat16", donate=True, method=method).transfer(
            tree, dst_sh)
        assert stats.donated is False
        assert not tree["w"].is_deleted()
        np.testing.assert_array_equal(np.asarray(out["w"]),
                                      np.asarray(tree["w"]).astype(jnp.bfloat16))


def test_no_target_layout_hands_the_tree_over(eight_devices):
    # vLLM's sampler has no device layout (shardings None): the tree is handed over uncast,
    # and its bytes are what the receiver takes.
    src_sh, _ = _cases(eight_devices)["fsdp->tp"]
    tree = _tree(src_sh)
    out, stats = Resharder(dtype="bfloat16").transfer(tree, None)
    assert out is tree and stats.method == "handover"
    assert stats.bytes == sum(x.nbytes for x in jax.tree.leaves(tree)) > 0


def test_staging_sharding_matches_the_target_index_map(eight_devices):
    d = eight_devices
    t4, s4 = _mesh(d[:4], (4,), ("fsdp",)), _mesh(d[4:], (2, 2), ("dp", "tp"))
    src, dst = NamedSharding(t4, P("fsdp")), NamedSharding(s4, P(None, "tp"))
    staged = staging_sharding(src, dst)
    assert set(staged.device_set) == set(d[:4])
    want = sorted(map(str, dst.devices_indices_map((8, 8)).values()))
    assert sorted(map(str, staged.devices_indices_map((8, 8)).values())) == want
    # 2 -> 6 devices: no layout on 2 devices has the 6 target blocks.
    assert staging_sharding(NamedSharding(_mesh(d[:2], (2,), ("f",)), P("f")),
                            NamedSharding(_mesh(d[2:], (6,), ("t",)), P("t"))) is None


# -- the Pathways switch ------------------------------------------------------------------------


def test_auto_picks_host_copy_on_cpu_and_not_pathways(eight_devices):
    src_sh, dst_sh = _cases(eight_devices)["fsdp->tp"]
    tree = _tree(src_sh)
    assert transfer_mod.pathways_reshard_api() is None  # JAX_PLATFORMS=cpu in the tests
    assert Resharder().resolve_method(tree, dst_sh) == "host_copy"
    with pytest.raises(TransferError, match="reshard.method=pathways"):
        Resharder(method="pathways").transfer(tree, dst_sh)


def test_pathways_path_is_used_when_available(monkeypatch, eight_devices):
    """Pretend to be on Pathways: pathwaysutils' real reshard runs over a fake IFRT transfer."""
    import pathwaysutils.jax as pw_jax

    calls = []

    def fake_transfer_to_shardings(arrays, shardings, donate):
        calls.append((len(arrays), donate))
        return jax.device_put(list(arrays), list(shardings))

    monkeypatch.setattr(transfer_mod, "_jax_platforms", lambda: "proxy")
    monkeypatch.setattr(pw_jax, "ifrt_reshard_available", lambda: True)
    monkeypatch.setattr(pw_jax, "transfer_to_shardings", fake_transfer_to_shardings)
    src_sh, dst_sh = _cases(eight_devices)["fsdp->tp"]
    tree = _tree(src_sh)
    r = Resharder()
    assert r.resolve_method(tree, dst_sh) == "pathways"
    out, stats = r.transfer(tree, dst_sh)
    assert stats.method == "pathways" and calls == [(2, False)]  # one batched call, no donation
    for k in tree:
        assert out[k].sharding == dst_sh[k]
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(tree[k]))
    # Not available (probe fails): back to the local path.
    monkeypatch.setattr(pw_jax, "ifrt_reshard_available", lambda: False)
    assert Resharder().resolve_method(tree, dst_sh) == "host_copy"


def test_bad_options_name_the_field():
    with pytest.raises(TransferError, match="reshard.method='nope'"):
        Resharder(method="nope")
    with pytest.raises(TransferError, match="reshard.chunk_bytes=0"):
        Resharder(chunk_bytes=0)


def test_bf16_sampler_takes_cast_weights_and_generates(tiny_model, meshes, tokenizer):
    from controller.config import SamplingConfig
    from controller.data.batch import encode_prompts
    from sampler.base import WeightMismatchError
    from sampler.jax_sampler import JaxSampler

    mdef, params = tiny_model
    sampler = JaxSampler(mdef, meshes.sampler, SamplingConfig(max_new_tokens=3),
                         pad_id=tokenizer.pad_id, stop_ids=(tokenizer.stop_id,),
                         param_dtype="bfloat16")
    trainer_sh = jax.tree.map(lambda ax, s: meshes.trainer.sharding(ax, s.shape),
                              mdef.logical_axes, mdef.shapes(),
                              is_leaf=lambda x: isinstance(x, tuple))
    master = jax.device_put(params, trainer_sh)  # fp32 master weights on the trainer
    fp32, _ = Resharder().transfer(master, sampler.shardings)
    with pytest.raises(WeightMismatchError, match="bfloat16"):
        sampler.load_weights(fp32)  # the bf16 sampler wants what reshard.dtype sends
    moved, stats = Resharder(dtype="bfloat16").transfer(master, sampler.shardings)
    sampler.load_weights(moved)
    assert stats.bytes == tree_bytes(master) // 2
    batch = encode_prompts([{"prompt": "12="}, {"prompt": "345="}], tokenizer)
    out = sampler.generate(batch.tokens_PxL, batch.mask_PxL, jax.random.key(0))
    logps = np.asarray(out.logps_BxT)
    assert logps.shape == (2, 3) and np.isfinite(logps).all() and (logps <= 0).all()


def test_reshard_config_section_validates():
    from controller.config import ConfigError, load_config

    cfg = load_config(overrides=["reshard.dtype=bfloat16", "reshard.chunk_bytes=1000000"])
    assert (cfg.reshard.dtype, cfg.reshard.chunk_bytes, cfg.reshard.donate) == (
        "bfloat16", 1_000_000, False)
    assert load_config().reshard.dtype is None  # default: the model's dtype, as before
    with pytest.raises(ConfigError, match="reshard.dtype='float16'"):
        load_config(overrides=["reshard.dtype=float16"])
    with pytest.raises(ConfigError, match="reshard.chunk_bytes=0"):
        load_config(overrides=["reshard.chunk_bytes=0"])


def test_host_copy_recycles_buffers_only_after_their_arrays_die(eight_devices):
    src_sh, dst_sh = _cases(eight_devices)["fsdp->tp"]
    r = Resharder()

    def ptr(tree):
        return tree["w"].addressable_shards[0].data.unsafe_buffer_pointer()

    a_src = _tree(src_sh)
    a, _ = r.transfer(a_src, dst_sh)
    b_src = jax.tree.map(lambda x: x + 1, a_src)
    b, _ = r.transfer(b_src, dst_sh)
    assert ptr(b) != ptr(a)  # a is alive: its memory is not reused
    a_ptr = ptr(a)
    del a
    c_src = jax.tree.map(lambda x: x + 2, a_src)
    c, _ = r.transfer(c_src, dst_sh)
    assert ptr(c) == a_ptr  # a died: the next sync refills its memory
    for out, src in ((b, b_src), (c, c_src)):  # and nothing alive was overwritten
        for k in src:
            np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(src[k]))


# -- host_copy: plans, the native kernel, recycled buffers -------------------------------------

from reshard import hostcopy  # noqa: E402


def test_box_blocks_merge_what_is_contiguous_on_both_sides():
    # float32 (itemsize 4). A 2x3 box of a (4, 5) source into a contiguous (2, 3) target:
    # rows of 3*4 = 12 bytes, 20 bytes apart in the source and 12 in the target.
    assert hostcopy.box_blocks((2, 3), [12, 4], [20, 4], 4) == [(0, 0, 2, 12, 12, 20)]
    # Whole rows on both sides: one contiguous run of 2*5*4 = 40 bytes.
    assert hostcopy.box_blocks((2, 5), [20, 4], [20, 4], 4) == [(0, 0, 1, 40, 40, 40)]
    # The FSDP -> TP q_proj piece: (192, 3, 64) of a (192, 12, 64) source shard into a
    # (768, 3, 64) target shard. The inner (3, 64) = 768 bytes are contiguous on both sides;
    # the 192 rows are 768 bytes apart in the target and 12*64*4 = 3072 in the source.
    assert hostcopy.box_blocks((192, 3, 64), [768, 256, 4], [3072, 256, 4], 4) == [
        (0, 0, 192, 768, 768, 3072)]
    # Unit dimensions vanish; an outer dimension that continues neither side evenly is
    # unrolled: (2, 3, 4) of a (2, 6, 8) source (strides 192, 32, 4) into a contiguous target
    # (48, 16, 4): rows of 16 bytes, and the second 3-row block starts 48 / 192 bytes in.
    assert hostcopy.box_blocks((2, 1, 3, 4), [48, 48, 16, 4], [192, 192, 32, 4], 4) == [
        (0, 0, 3, 16, 16, 32), (48, 192, 3, 16, 16, 32)]
    assert hostcopy.box_blocks((0, 4), [16, 4], [16, 4], 4) == []


def _shards_equal(out, tree, dst_sh):
    for k in tree:
        assert out[k].sharding == dst_sh[k] and out[k].dtype == tree[k].dtype, k
        want = np.asarray(tree[k])
        for shard in out[k].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])


def _need_native():
    if hostcopy.native_kernel() is None:
        pytest.skip(hostcopy.native_status())


ODD = {  # rows that are not whole 64-byte lines: partial first / last lines per row
    "odd rows": ({"w": ((16, 100), np.float32, "fsdp"), "b": ((5, 300), jnp.bfloat16, None)},
                 {"w": P(None, "tp"), "b": P(None, "tp")}),
}


@pytest.mark.parametrize("case", [*CASES, "odd rows"])
def test_native_kernel_and_numpy_copies_agree_bit_for_bit(case, eight_devices, monkeypatch):
    _need_native()
    monkeypatch.setattr(hostcopy, "STREAM_MIN_BYTES", 0)  # streaming stores, even this small
    monkeypatch.setattr(hostcopy, "CHUNK_BYTES", 128)  # many chunks: the threads share stages
    d = eight_devices
    if case in ODD:
        t4, s4 = _mesh(d[:4], (4,), ("fsdp",)), _mesh(d[4:], (4,), ("tp",))
        src, dst = ODD[case]
        src_sh = {k: (shape, dt, NamedSharding(t4, P(ax))) for k, (shape, dt, ax) in src.items()}
        dst_sh = {k: NamedSharding(s4, spec) for k, spec in dst.items()}
        dtypes = [None]
    else:
        src_sh, dst_sh = _cases(d)[case]
        dtypes = [np.float32, jnp.bfloat16, np.int8]
    for dtype in dtypes:
        tree = _tree({k: (shape, dtype or dt, sh) for k, (shape, dt, sh) in src_sh.items()})
        xs, dsts = list(tree.values()), list(dst_sh.values())
        for copier in (hostcopy.HostCopier(threads=0, native=True),
                       hostcopy.HostCopier(threads=2, native=True),
                       hostcopy.HostCopier(threads=0, native=False)):
            out = dict(zip(tree, copier.run(xs, dsts), strict=True))
            _shards_equal(out, tree, dst_sh)
            assert copier.last["kernel"] == ("native" if copier.native else "numpy")
            assert copier.last["streaming"] == bool(copier.native)


@pytest.mark.parametrize("copy_threads", [0, 1, 2])
def test_a_held_output_is_never_overwritten_by_later_syncs(copy_threads, eight_devices):
    """The sampler keeps one sync's weights while later syncs recycle buffers: the kept
    arrays must keep their values (read only at the end, so no cached host copy hides a
    change)."""
    src_sh, dst_sh = _cases(eight_devices)["fsdp->tp"]
    base = _tree(src_sh)
    srcs = [jax.tree.map(lambda x, i=i: x + i, base) for i in range(5)]
    r = Resharder(method="host_copy", copy_threads=copy_threads)
    held, _ = r.transfer(srcs[0], dst_sh)
    reused = []
    for src in srcs[1:]:
        out, _ = r.transfer(src, dst_sh)
        reused.append(r._host.last["reused"])
        _shards_equal(out, src, dst_sh)
        del out  # dropped, as the sampler drops the previous weights: its buffers recycle
    assert reused == [False, True, True, True]  # the later syncs really refilled buffers
    if copy_threads and hostcopy.native_kernel() is not None:
        assert r._host.last["overlapped"]  # arrays were made while the copy ran
    _shards_equal(held, srcs[0], dst_sh)


def test_buffers_a_pending_computation_reads_are_not_recycled(eight_devices):
    src_sh, dst_sh = _cases(eight_devices)["fsdp->tp"]
    a_src = _tree(src_sh)
    r = Resharder(method="host_copy")

    @jax.jit
    def slow(t):  # reads its input on every one of 1M steps: acc <- acc / 2 + x
        return jax.tree.map(lambda x: jax.lax.fori_loop(
            0, 1_000_000, lambda i, acc: acc * 0.5 + x, jnp.zeros_like(x)), t)

    want = slow(jax.device_put(a_src, dst_sh))  # the same program on a private copy
    b_src = jax.block_until_ready(jax.tree.map(lambda x: x + 1, a_src))
    a, _ = r.transfer(a_src, dst_sh)
    pending = slow(a)  # dispatched asynchronously; runs for a while
    del a  # now only the running computation holds a's buffers
    b, _ = r.transfer(b_src, dst_sh)
    # JAX releases an adopted buffer only once no computation uses it; had b refilled a's
    # buffers under the running loop, its result would differ (checked by breaking in_use).
    assert r._host.last["reused"] is False
    for k in a_src:
        np.testing.assert_array_equal(np.asarray(pending[k]), np.asarray(want[k]))
    del b


def test_host_copy_plans_are_cached_per_layout_pair(eight_devices):
    src_sh, dst_sh = _cases(eight_devices)["fsdp->tp"]
    tree = _tree(src_sh)
    r = Resharder(method="host_copy")
    r.transfer(tree, dst_sh)
    r.transfer(jax.tree.map(lambda x: x * 2, tree), dst_sh)  # new arrays, same layouts
    assert len(r._host._plans) == 1
    other = {k: NamedSharding(v.mesh, P()) for k, v in dst_sh.items()}  # replicated targets
    out, _ = r.transfer(tree, other)
    assert len(r._host._plans) == 2
    _shards_equal(out, tree, other)


def test_copy_chunks_tile_each_stage_at_group_boundaries(eight_devices, monkeypatch):
    monkeypatch.setattr(hostcopy, "CHUNK_BYTES", 256)  # many chunks from a small tree
    src_sh, dst_sh = _cases(eight_devices)["2->6"]
    tree = _tree(src_sh)
    plan = hostcopy.Plan.build(list(tree.values()), list(dst_sh.values()))
    b = plan.blocks_Nx8
    starts, i = set(), 0
    while i < len(b):
        starts.add(i)
        i += max(1, int(b[i, 6]))
    ch = plan.chunks()
    bounds, stage_chunks = ch.bounds.tolist(), ch.stage_chunks.tolist()
    assert bounds[-1] == len(b) and bounds == sorted(set(bounds))
    assert len(stage_chunks) == len(plan.stages) + 1
    assert len(bounds) - 1 > len(plan.stages)  # stages really were cut
    for s, (_, _, lo, hi) in enumerate(plan.stages):
        c0, c1 = stage_chunks[s], stage_chunks[s + 1]
        assert bounds[c0] == lo and bounds[c1] == hi  # the stage's chunks tile it exactly
        for c in range(c0, c1):
            assert bounds[c] in starts  # no lockstep group is split
            nbytes = int((b[bounds[c]:bounds[c + 1], 2] * b[bounds[c]:bounds[c + 1], 3]).sum())
            first = b[bounds[c]]
            group = b[bounds[c]:bounds[c] + max(1, int(first[6]))]
            # Within budget, unless one group alone is bigger (it is never split).
            assert nbytes <= 256 or bounds[c + 1] - bounds[c] == len(group)


def test_host_copy_refuses_a_non_row_major_source(eight_devices):
    from jax.experimental.layout import Format, Layout

    src_sh, dst_sh = _cases(eight_devices)["tp->fsdp"]
    tree = _tree(src_sh)
    col_major = jax.jit(lambda x: x + 0, out_shardings=Format(
        Layout(major_to_minor=(1, 0)), src_sh["w"][2]))(tree["w"])
    with pytest.raises(ValueError, match="not dense row-major.*reshard.method=device_put"):
        Resharder(method="host_copy").transfer({"w": col_major}, dst_sh)


def test_without_the_native_kernel_host_copy_uses_numpy(monkeypatch, eight_devices):
    monkeypatch.setenv("TANDEM_HOSTCOPY_NATIVE", "0")
    monkeypatch.setattr(hostcopy, "_native", None)
    monkeypatch.setattr(hostcopy, "_native_error", None)
    assert hostcopy.native_kernel() is None
    assert "TANDEM_HOSTCOPY_NATIVE=0" in hostcopy.native_status()
    src_sh, dst_sh = _cases(eight_devices)["2->6"]
    tree = _tree(src_sh)
    r = Resharder(method="host_copy")
    out, _ = r.transfer(tree, dst_sh)
    assert r._host.last["kernel"] == "numpy"
    _shards_equal(out, tree, dst_sh)
    with pytest.raises(RuntimeError, match="native=True"):
        hostcopy.HostCopier(native=True).run(list(tree.values()), list(dst_sh.values()))


def test_native_kernel_builds_into_the_cache_dir(monkeypatch, tmp_path):
    import shutil

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TANDEM_HOSTCOPY_NATIVE", raising=False)
    monkeypatch.setattr(hostcopy, "_native", None)
    monkeypatch.setattr(hostcopy, "_native_error", None)
    kernel = hostcopy.native_kernel()
    assert kernel is not None, hostcopy.native_status()
    assert len(list((tmp_path / "tandem").glob("hostcopy-*.so"))) == 1
    assert "native block copies" in hostcopy.native_status()


def test_copy_threads_must_not_be_negative():
    with pytest.raises(TransferError, match="copy_threads=-1"):
        Resharder(copy_threads=-1)


def test_portable_kernel_without_simd_copies_exactly(monkeypatch, tmp_path, eight_devices):
    """The kernel as it builds off x86 (plain memcpy rows, no streaming stores)."""
    import ctypes
    import shutil
    import subprocess

    cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        pytest.skip("no C compiler")
    so = tmp_path / "portable.so"
    subprocess.run([cc, "-O2", "-std=gnu11", "-DTANDEM_NO_SIMD", "-shared", "-fPIC",
                    str(hostcopy._SOURCE), "-o", str(so)], check=True)
    kernel = hostcopy._Native(ctypes.CDLL(str(so)))
    assert kernel.stream_level == 0
    monkeypatch.setattr(hostcopy, "_native", kernel)
    monkeypatch.setattr(hostcopy, "STREAM_MIN_BYTES", 0)
    for case in ("2->6", "uneven 3->5", "2d mesh + int + scalar"):
        src_sh, dst_sh = _cases(eight_devices)[case]
        tree = _tree(src_sh)
        for threads in (0, 2):
            copier = hostcopy.HostCopier(threads=threads, native=True)
            out = dict(zip(tree, copier.run(list(tree.values()), list(dst_sh.values())),
                           strict=True))
            _shards_equal(out, tree, dst_sh)


def test_copy_threads_share_chunks_and_stop_at_a_cancelled_stage():
    """The contract the calling thread relies on: any number of threads share a stage's chunks
    (each copied exactly once), and a stage published as cancelled stops every thread there."""
    import threading

    _need_native()
    kernel = hostcopy.native_kernel()
    src = np.arange(4 * 4096, dtype=np.uint8).reshape(4, 4096) % 251
    dst = np.zeros_like(src)
    # Four contiguous one-row blocks; stages {0, 1} and {2, 3}; each block is its own chunk.
    blocks = np.zeros((4, 8), np.int64)
    for i in range(4):
        blocks[i, :4] = dst[i].ctypes.data, src[i].ctypes.data, 1, 4096
        blocks[i, 4:6] = 4096
    chunks = hostcopy.Chunks(np.array([0, 1, 2, 3, 4], np.int64), np.array([0, 2, 4], np.int64))
    ready, taken = np.zeros(2, np.int64), np.zeros(2, np.int64)
    done = []
    threads = [threading.Thread(target=lambda: done.append(
        kernel.copy_shared(blocks, chunks, ready, taken, True))) for _ in range(3)]
    for t in threads:
        t.start()
    kernel.publish(ready, 0, 1)
    kernel.publish(ready, 1, -1)  # the caller failed preparing stage 1
    for t in threads:
        t.join(timeout=10)
    assert done == [1, 1, 1]  # every thread stopped at stage 1
    np.testing.assert_array_equal(dst[:2], src[:2])  # stage 0 copied (once: 2 chunks taken)
    assert int(taken[0]) >= 2 and not dst[2:].any()  # stage 1 never touched
    ready[:], taken[:], dst[:] = 1, 0, 0
    assert kernel.copy_shared(blocks, chunks, ready, taken, False) == 2  # a late joiner alone
    np.testing.assert_array_equal(dst, src)
