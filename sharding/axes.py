"""The mesh axes (hardware), outermost first; logical axis names live in ``rules.py``'s table."""

# `data` is pure data parallelism, `fsdp` shards parameters and batch, `context` shards the sequence
# (context parallelism; it also shards parameters, like fsdp), `tensor` shards heads and hidden
# units (Megatron style), `expert` shards experts (and the batch outside expert layers). The order is
# MaxText's: context after fsdp and before tensor, so the axes that exchange the most per layer
# (tensor, then context's key/value all-gathers) are the innermost, nearest neighbours on the devices.
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "context", "tensor", "expert")

# The mesh axes that may also span TPU slices over the data-center network (``mesh.dcn_<axis>``):
# data parallelism reduces the gradients across them once per step (per microbatch), fsdp gathers
# weights and reduce-scatters gradients in every layer. The others (context, tensor, expert)
# exchange activations within every layer and stay within a slice.
DCN_AXES: tuple[str, ...] = ("data", "fsdp")
