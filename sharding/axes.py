"""The mesh axes (hardware), outermost first; logical axis names live in ``rules.py``'s table."""

# `data` is pure data parallelism, `fsdp` shards parameters and batch, `tensor` shards heads and
# hidden units (Megatron style), `expert` shards experts (and the batch outside expert layers).
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")
