"""The vocabulary of axis names: mesh axes (hardware) and logical axes (what a tensor dimension means)."""

# Mesh axes, outermost first. `data` is pure data parallelism, `fsdp` shards parameters and batch,
# `tensor` shards heads and hidden units (Megatron style), `expert` shards experts (and the batch
# outside expert layers).
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")

# Logical axes that model code may name.
LOGICAL_AXES: tuple[str, ...] = (
    "batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
    "experts", "expert_mlp", "layers",
)
