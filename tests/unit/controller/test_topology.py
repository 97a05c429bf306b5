import jax
import pytest

from controller.config import TopologyConfig
from controller.topology import TopologyError, build_meshes


def _ids(submesh):
    return {d.id for d in submesh.mesh.devices.flat}


def test_default_split_is_disjoint_and_covers_all_devices(meshes):
    t, s = _ids(meshes.trainer), _ids(meshes.sampler)
    assert t.isdisjoint(s)
    assert t | s == {d.id for d in jax.devices()}
    assert meshes.trainer.mesh.shape == {"fsdp": 4}
    assert meshes.sampler.mesh.shape == {"dp": 1, "tp": 4}


@pytest.mark.parametrize("n_train", [1, 2, 6, 7])
def test_split_by_count(n_train):
    m = build_meshes(TopologyConfig(trainer_devices=n_train))
    assert (m.trainer.size, m.sampler.size) == (n_train, 8 - n_train)
    assert _ids(m.trainer).isdisjoint(_ids(m.sampler))


def test_split_by_fraction():
    m = build_meshes(TopologyConfig(trainer_fraction=0.75))
    assert (m.trainer.size, m.sampler.size) == (6, 2)


def test_refuses_split_leaving_a_side_empty():
    with pytest.raises(TopologyError, match="topology.trainer_devices=8 gives 8 trainer"):
        build_meshes(TopologyConfig(trainer_devices=8))


def test_refuses_mesh_that_does_not_fit_the_side():
    with pytest.raises(TopologyError, match=r"trainer_mesh=\{'fsdp': 3\} has 3 devices"):
        build_meshes(TopologyConfig(trainer_mesh={"fsdp": 3}))
    with pytest.raises(TopologyError, match="do not divide the 4 sampler"):
        build_meshes(TopologyConfig(sampler_mesh={"dp": 3, "tp": -1}))


def test_logical_rules_place_axes_and_replicate_what_does_not_divide(meshes):
    from jax.sharding import PartitionSpec as P

    # mlp -> tp on the sampler; 2 kv heads cannot split over tp=4, so they are replicated.
    assert meshes.sampler.spec(("embed", "mlp"), (32, 64)) == P(None, "tp")
    assert meshes.sampler.spec(("embed", "kv_heads", "head_dim"), (32, 2, 8)) == P(None, None,
                                                                                  None)
    assert meshes.trainer.spec(("embed", "mlp"), (32, 64)) == P("fsdp", None)
    # A mesh axis is used at most once per array.
    assert meshes.trainer.spec(("embed", "embed"), (32, 32)) == P("fsdp", None)
