"""The mesh axes (hardware), outermost first; logical axis names live in ``rules.py``'s table."""

# `data` is pure data parallelism, `fsdp` shards parameters and batch, `context` shards the sequence
# (context parallelism; it also shards parameters, like fsdp), `tensor` shards heads and hidden
# units (Megatron style), `expert` shards experts (and the batch outside expert layers). The order is
# MaxText's: context after fsdp and before tensor, so the axes that exchange the most per layer
# (tensor, then context's key/value all-gathers) are the innermost, nearest neighbours on the devices.
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "context", "tensor", "expert")
