"""Flax NNX language-model modules. They name logical axes only, never mesh axes.

Shape letters used in tensor names and einsum strings throughout the codebase:
  B batch            T length (query positions)   S key/value (cached) length
  D embed (d_model)  N query heads                K key/value heads
  G query heads per kv head (N = K*G)              H head dim
  F mlp hidden       V vocab                      L layers
  E experts          C expert capacity            R experts chosen per token (top-k)
  A routed assignments (token, choice), flattened
A tensor named ``x_btd`` has layout [batch, length, embed]; a weight ``w_dnh`` maps embed to heads.
"""
