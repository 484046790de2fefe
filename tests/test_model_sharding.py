"""Born-sharded creation on 8 fake CPU devices, and the logical -> mesh mapping of activations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from model_configs import model_config

from configs import default
from models import Transformer, sharding

CFG = model_config(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    scan_layers=True,
    mlp_dim=64, max_seq_len=16, positions="learned", tie_embeddings=False, use_bias=True,
    qk_norm=True,
)  # fmt: skip

# Each parameter's logical names by its path's last two keys (stacked blocks get "layers"
# prepended). Written out here so that a renamed axis in models/ fails this test.
EXPECTED_NAMES = {
  ("embed", "table"): ("vocab", "embed"),
  ("pos_embed", "table"): ("positions", "embed"),
  ("attn", "q_kernel"): ("embed", "heads", "head_dim"),
  ("attn", "k_kernel"): ("embed", "kv_heads", "head_dim"),
  ("attn", "v_kernel"): ("embed", "kv_heads", "head_dim"),
  ("attn", "out_kernel"): ("heads", "head_dim", "embed"),
  ("attn", "q_bias"): ("heads", "head_dim"),
  ("attn", "k_bias"): ("kv_heads", "head_dim"),
  ("attn", "v_bias"): ("kv_heads", "head_dim"),
  ("attn", "out_bias"): ("embed",),
  ("q_norm", "scale"): ("head_dim",),
  ("k_norm", "scale"): ("head_dim",),
  ("mlp", "up_kernel"): ("embed", "mlp"),
  ("mlp", "gate_kernel"): ("embed", "mlp"),
  ("mlp", "down_kernel"): ("mlp", "embed"),
  ("mlp", "up_bias"): ("mlp",),
  ("mlp", "gate_bias"): ("mlp",),
  ("mlp", "down_bias"): ("embed",),
  ("attn_norm", "scale"): ("embed",),
  ("attn_norm", "bias"): ("embed",),
  ("mlp_norm", "scale"): ("embed",),
  ("mlp_norm", "bias"): ("embed",),
  ("final_norm", "scale"): ("embed",),
  ("final_norm", "bias"): ("embed",),
  ("unembed",): ("embed", "vocab"),
}


def _rules():
  return tuple(
    (name, tuple(axes) if isinstance(axes, list | tuple) else axes)
    for name, axes in default.get_config().mesh.rules
  )


@pytest.mark.parametrize("mesh_shape, scan_layers", [((2, 4, 1), True), ((1, 4, 2), False)])
def test_born_sharded_creation(mesh_shape, scan_layers):
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  # The default rules name every axis of Loom's mesh: a mesh for them has them all (size 1 here).
  devices = np.array(jax.devices()).reshape(1, *mesh_shape, 1, 1)
  mesh = Mesh(devices, ("stage", "data", "fsdp", "tensor", "context", "expert"))
  rules = _rules()
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(abstract_state, mesh)
    state = jax.jit(
      lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1], out_shardings=shardings
    )()
    # Eager sharding alone (no out_shardings) must agree: parameters are constrained at birth.
    eager_state = jax.jit(lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1])()

    rule_map = dict(rules)
    flat = nnx.to_flat_state(state)
    eager_flat = dict(nnx.to_flat_state(eager_state))
    assert len(flat) == len(eager_flat) > 10
    for path, param in flat:
      names = EXPECTED_NAMES[tuple(str(k) for k in path[-2:])]
      if scan_layers and path[0] == "blocks":
        names = ("layers",) + names
      assert param.get_metadata()["out_sharding"] == names, path
      spec = PartitionSpec(*(rule_map[n] for n in names))
      expected = NamedSharding(mesh, spec)
      value = param[...]
      assert value.sharding == expected, (path, value.sharding, expected)
      assert eager_flat[path][...].sharding.is_equivalent_to(expected, value.ndim), path
      shard_shape = expected.shard_shape(value.shape)
      assert all(s.data.shape == shard_shape for s in value.addressable_shards), path

    # The sharded model runs; logits come out sharded over the batch.
    tokens = jnp.zeros((8, 16), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (8, 16))
    logits = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, p))(state, tokens, positions)
    assert logits.sharding.is_equivalent_to(
      NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor")), 3
    )
  unsharded = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, p))(
    nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))), tokens, positions
  )
  np.testing.assert_allclose(logits, unsharded, atol=1e-5, rtol=1e-5)


def test_active_spec_and_constrain():
  x = jnp.ones((8, 4, 32))
  assert sharding.constrain(x, ("batch", "length", "embed")) is x  # no mesh, no rules: no-op
  assert sharding.active_spec(("batch", "embed")) == PartitionSpec()
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(_rules()):
    # "fsdp" is taken by the batch axis, so "embed" is replicated; "tensor" is not in this mesh.
    spec = sharding.active_spec(("batch", "length", "embed"))
    assert spec == PartitionSpec(("data", "fsdp"), None, None)
    assert sharding.active_spec(("embed", "mlp")) == PartitionSpec("fsdp", None)
    y = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "length", "embed")))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, spec), 3)
    with pytest.raises(ValueError, match="do not match"):
      sharding.constrain(x, ("batch", "embed"))
