"""ModelConfig: the frozen description of a decoder-only language model's architecture."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from core.options import option

Position = Literal["rope", "learned"]
Activation = Literal["swiglu", "gelu", "geglu"]
RopeScaling = Literal["none", "linear", "llama3", "yarn"]
DType = Literal["float32", "bfloat16"]
Remat = Literal["none", "full", "dots", "dots_no_batch"]
MoEImpl = Literal["capacity", "dropless"]
AttentionImpl = Literal["auto", "einsum", "xla", "blockwise", "splash"]
MoEMatmul = Literal["auto", "ragged_dot", "megablox", "tiled"]
RouterMode = Literal["softmax_topk", "topk_softmax", "softmax_topk_unnormalized", "sigmoid_topk",
                     "sigmoid_topk_unnormalized"]
AttentionType = Literal["gqa", "mla"]

# Keys that change how the model is computed, not its parameters or the function it computes (up to
# rounding: ``dtype`` is the compute dtype; parameters stay in ``param_dtype``). A resumed run may
# change them (train/config.py, RESUMABLE). Not ``moe_impl`` or ``capacity_factor``: the capacity
# path drops assignments that the dropless one keeps.
RUNTIME_KEYS = frozenset({"dtype", "remat", "scan_layers", "attention_impl", "attention_block",
                          "loss_chunk", "fused_projections", "moe_matmul"})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder LM, dense or Mixture-of-Experts. ``head_dim=0`` means
    ``d_model // num_heads``.

    MoE (``num_experts > 0``): after ``first_dense_layers`` dense blocks, the remaining layers form
    groups of ``moe_every`` blocks whose last one routes each token to ``experts_per_token`` of
    ``num_experts`` experts (SwiGLU/GELU of width ``expert_mlp_dim``, 0 = ``mlp_dim``), plus
    ``num_shared_experts`` always-on experts. ``router_mode``: ``softmax_topk`` = softmax over all
    experts, then the top-k probabilities renormalised to sum 1; ``topk_softmax`` = softmax over the
    top-k logits (Mixtral; the same function in exact arithmetic); ``softmax_topk_unnormalized`` =
    the top-k probabilities as they are (Switch, DeepSeek; the only one whose gates carry a gradient
    to the router when k = 1). ``moe_impl``: ``capacity`` = each expert takes at most
    ceil(capacity_factor * T * k / num_experts) assignments of a row of T tokens, in token order, the
    rest are dropped (the residual carries them); ``dropless`` = grouped matmuls, nothing dropped
    (``moe_matmul``: ``ragged_dot``, ``megablox``, the Pallas TPU kernel, or ``tiled``, groups padded
    to whole tiles of rows; ``auto`` = megablox for TPU, ragged_dot for GPU, tiled for CPU:
    model/grouped_matmul.py). ``aux_loss_coef`` scales the Switch load-balancing loss,
    ``z_loss_coef`` the router z-loss (both averaged over MoE layers).

    ``fused_projections``: the q, k and v weights (and a SwiGLU MLP's gate and up weights) are
    concatenated at run time and applied as one matmul whose output is split again -- the same
    parameters and results, fewer and larger matmuls. It pays where matmuls are small and
    unsharded (the baby CPU preset: bench.baby); under tensor parallelism it would concatenate and
    re-split head-sharded tensors, so it is off by default.

    Architecture options of imported families (every default is off; model/attention.py,
    model/layers.py): ``qkv_bias`` (Qwen2), ``qk_norm`` (Qwen3, Gemma 3), ``norm_plus_one``,
    ``post_norms``, ``embed_scale``, ``activation=geglu``, ``query_pre_attn_scalar``, the softcaps
    (Gemma 2), ``rope_scaling`` with its ``rope_*`` parameters (exactly as transformers'
    ROPE_INIT_FUNCTIONS) and ``rope_local_theta`` (Gemma 3's plain RoPE base of local layers).
    """

    vocab_size: int = option(384, "token ids the embedding and head hold (>= the tokenizer's)")
    d_model: int = option(256, "width of the residual stream")
    num_layers: int = option(4, "decoder blocks")
    num_heads: int = option(8, "query heads per attention layer")
    num_kv_heads: int = option(8, "key/value heads (grouped-query attention: divides num_heads)")
    head_dim: int = option(0, "width of a head; 0 = d_model // num_heads")
    mlp_dim: int = option(1024, "hidden units of a dense MLP")
    max_seq_len: int = option(512, "longest context the model is built for (learned positions, windows)")
    position: Position = option("rope", "rotary position embeddings or a learned table")
    rope_theta: float = option(10000.0, "RoPE base frequency")
    rope_scaling: RopeScaling = option(
        "none", "RoPE frequency scaling, as transformers' rope_type: none, linear, llama3 or yarn")
    rope_scaling_factor: float = option(1.0, "RoPE scaling: the context extension factor")
    rope_original_max_len: int = option(
        0, "llama3/yarn: the pretraining context (original_max_position_embeddings); 0 = max_seq_len")
    rope_low_freq_factor: float = option(1.0, "llama3 RoPE scaling: low_freq_factor")
    rope_high_freq_factor: float = option(4.0, "llama3 RoPE scaling: high_freq_factor")
    rope_beta_fast: float = option(32.0, "yarn RoPE scaling: beta_fast")
    rope_beta_slow: float = option(1.0, "yarn RoPE scaling: beta_slow")
    rope_attention_factor: float = option(
        0.0, "yarn: factor on cos and sin; 0 = transformers' default 0.1 ln(factor) + 1")
    rope_truncate: bool = option(True, "yarn: round the correction range to whole dimensions")
    rope_local_theta: float = option(
        0.0, "RoPE base of local (sliding-window) layers, unscaled; 0 = as the global layers")
    norm_eps: float = option(1e-6, "RMSNorm epsilon")
    activation: Activation = option(
        "swiglu", "MLP activation: SwiGLU or GeGLU (gate and up weights: silu or tanh-gelu gate), or GELU")
    tie_embeddings: bool = option(True, "the LM head reuses the token embedding table")
    qkv_bias: bool = option(False, "the q, k and v projections have biases (Qwen2)")
    qk_norm: bool = option(False, "RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3)")
    norm_plus_one: bool = option(False, "every RMSNorm multiplies by 1 + scale, scale from 0 (Gemma)")
    post_norms: bool = option(False, "RMSNorm of the attention and MLP outputs before the residual add")
    embed_scale: bool = option(False, "token embeddings multiplied by sqrt(d_model) (Gemma)")
    query_pre_attn_scalar: float = option(
        0.0, "attention scores scaled by this**-0.5 instead of head_dim**-0.5; 0 = head_dim")
    attn_logit_softcap: float = option(
        0.0, "attention scores -> cap * tanh(scores / cap) before the mask; 0 = off (Gemma 2)")
    final_logit_softcap: float = option(0.0, "LM logits -> cap * tanh(logits / cap); 0 = off (Gemma 2)")
    param_dtype: DType = option("float32", "dtype parameters are stored (and checkpointed) in")
    dtype: DType = option("float32", "compute dtype; norms, softmax, router and loss stay float32")
    scan_layers: bool = option(True, "run the layers with lax.scan (compile time flat in depth)")
    remat: Remat = option("none", "recompute activations in the backward pass (jax.checkpoint policy)")
    attention_impl: AttentionImpl = option(
        "auto", "attention kernel: auto picks by backend (splash on TPU, see model/attention.py)")
    attention_block: int = option(128, "query rows per block of attention_impl=blockwise")
    sliding_window: int = option(
        0, "local attention: a query sees this many tokens (itself included); 0 = off")
    sliding_window_pattern: int = option(
        0, "with sliding_window: every Nth layer is global (N-1 local, 1 global); 0 = all local")
    loss_chunk: int = option(0, ">0: cross-entropy over chunks of this many positions (model/loss.py)")
    fused_projections: bool = option(False, "one matmul for q/k/v (and SwiGLU gate/up): unsharded CPU runs")
    init_std: float = option(0.02, "standard deviation of the normal weight initialisation")
    num_experts: int = option(0, "routed experts of an MoE layer; 0 = a dense model")
    experts_per_token: int = option(2, "experts each token is routed to (top-k)")
    moe_every: int = option(1, "layers per MoE group (the group's last layer is MoE)")
    first_dense_layers: int = option(0, "dense layers before the first MoE group")
    num_shared_experts: int = option(0, "always-on experts added to the routed ones")
    expert_mlp_dim: int = option(0, "hidden units of an expert; 0 = mlp_dim")
    capacity_factor: float = option(1.25, "capacity path: an expert takes this times its even share")
    moe_impl: MoEImpl = option("capacity", "capacity (fixed buffers, overflow dropped) or dropless")
    moe_matmul: MoEMatmul = option(
        "auto", "dropless grouped matmul: auto = megablox gmm on TPU, ragged_dot on GPU, tiled on CPU")
    router_mode: RouterMode = option("softmax_topk", "how top-k gates come from the router logits")
    aux_loss_coef: float = option(0.01, "weight of the Switch load-balancing loss")
    z_loss_coef: float = option(0.001, "weight of the router z-loss")
    seq_aux_loss_coef: float = option(
        0.0, "weight of the sequence-wise balance loss (DeepSeek-V3: balance within each row)")
    router_bias_rate: float = option(
        0.0, "aux-loss-free balancing: a per-expert selection bias moved by this (gamma) times "
        "sign(mean load - load) after each step; 0 = off")
    routed_scaling_factor: float = option(1.0, "the routed experts' combined output is multiplied by this")
    router_groups: int = option(1, "group-limited routing: experts form this many groups (n_group)")
    router_topk_groups: int = option(
        0, "group-limited routing: a token picks its experts within this many best groups; 0 = all")
    attention_type: AttentionType = option(
        "gqa", "gqa (grouped-query) or mla (DeepSeek's multi-head latent attention)")
    q_lora_rank: int = option(0, "mla: rank of the compressed query; 0 = a full-rank query projection")
    kv_lora_rank: int = option(0, "mla: width of the compressed key/value latent (what the cache keeps)")
    qk_rope_head_dim: int = option(0, "mla: width of each head's rotary part of the query and key")
    qk_nope_head_dim: int = option(0, "mla: width of each head's non-rotary part of the query and key")
    v_head_dim: int = option(0, "mla: width of each value head; 0 = qk_nope_head_dim")
    mtp_depth: int = option(0, "multi-token prediction modules (DeepSeek-V3); 0 = off")
    mtp_loss_weight: float = option(0.3, "weight of the mean multi-token-prediction loss")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def is_local_layer(self, depth: int) -> bool:
        """Whether the layer at ``depth`` (0-based) attends within ``sliding_window`` tokens: with a
        window, every layer but each ``sliding_window_pattern``-th (Gemma's 5 local : 1 global is 6)."""
        if not self.sliding_window:
            return False
        return not self.sliding_window_pattern or (depth + 1) % self.sliding_window_pattern != 0

    @property
    def gated_mlp(self) -> bool:
        """Whether the MLP has a gate weight (SwiGLU, GeGLU) besides its up and down weights."""
        return self.activation in ("swiglu", "geglu")

    @property
    def query_scale(self) -> float:
        """The factor the queries are multiplied by before attention so that the kernels' fixed
        head_dim**-0.5 becomes query_pre_attn_scalar**-0.5 (1 when that is unset)."""
        if not self.query_pre_attn_scalar:
            return 1.0
        return (self.resolved_head_dim / self.query_pre_attn_scalar) ** 0.5

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def resolved_expert_mlp_dim(self) -> int:
        return self.expert_mlp_dim or self.mlp_dim

    @property
    def num_dense_first(self) -> int:
        """Dense layers before the first MoE group (all layers of a dense model)."""
        return self.first_dense_layers if self.is_moe else self.num_layers

    @property
    def num_moe_layers(self) -> int:
        """MoE layers = groups of ``moe_every`` layers after the first dense ones."""
        return (self.num_layers - self.num_dense_first) // self.moe_every if self.is_moe else 0

    @property
    def moe_layer_indices(self) -> list[int]:
        """Depth (0-based) of each MoE layer: the last block of each group of ``moe_every``."""
        first, every = self.num_dense_first, self.moe_every
        return [first + g * every + every - 1 for g in range(self.num_moe_layers)]

    def expert_capacity(self, tokens: int) -> int:
        """Assignments one expert takes from a group of ``tokens`` tokens (capacity path)."""
        k, e = self.experts_per_token, self.num_experts
        return max(1, min(tokens, math.ceil(self.capacity_factor * tokens * k / e)))

    def problems(self) -> list[tuple[str, str]]:
        """Returns (key, message) pairs for every inconsistency; empty when the config is usable."""
        out = []
        for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                    "max_seq_len"):
            if getattr(self, key) < 1:
                out.append((key, f"must be >= 1, got {getattr(self, key)}"))
        if out:
            return out
        if self.head_dim < 0:
            out.append(("head_dim", f"must be >= 0 (0 = d_model // num_heads), got {self.head_dim}"))
        if self.num_kv_heads > self.num_heads or self.num_heads % self.num_kv_heads:
            out.append(("num_kv_heads", f"num_heads={self.num_heads} is not divisible by "
                        f"num_kv_heads={self.num_kv_heads}"))
        if not self.head_dim and self.d_model % self.num_heads:
            out.append(("num_heads", f"d_model={self.d_model} is not divisible by num_heads="
                        f"{self.num_heads}; set model.head_dim explicitly"))
        if self.position == "rope" and self.resolved_head_dim % 2:
            out.append(("head_dim", f"RoPE needs an even head_dim, got {self.resolved_head_dim}"))
        if self.norm_eps <= 0:
            out.append(("norm_eps", f"must be > 0, got {self.norm_eps}"))
        if self.rope_theta <= 0:
            out.append(("rope_theta", f"must be > 0, got {self.rope_theta}"))
        if self.init_std <= 0:
            out.append(("init_std", f"must be > 0, got {self.init_std}"))
        if self.attention_impl not in ("auto", "einsum", "xla", "blockwise", "splash"):
            out.append(("attention_impl", f"must be auto, einsum, xla, blockwise or splash, got "
                        f"{self.attention_impl!r}"))
        for key in ("sliding_window", "sliding_window_pattern"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0 (0 = off), got {getattr(self, key)}"))
        if self.attention_block < 1:
            out.append(("attention_block", f"must be >= 1, got {self.attention_block}"))
        if self.loss_chunk < 0:
            out.append(("loss_chunk", f"must be >= 0 (0 = no chunking), got {self.loss_chunk}"))
        return (out + self.option_problems() + self.rope_problems() + self.moe_problems() +
                self.router_problems() + self.mla_problems())

    def option_problems(self) -> list[tuple[str, str]]:
        """Checks of the softcaps, the attention scale and the activation."""
        out = []
        for key in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            if not getattr(self, key) >= 0:
                out.append((key, f"must be >= 0 (0 = off), got {getattr(self, key)}"))
        if self.attn_logit_softcap and self.attention_impl == "xla":
            out.append(("attention_impl", "xla (jax.nn.dot_product_attention) cannot soft-cap "
                        "attention scores (attn_logit_softcap > 0): use auto, einsum, blockwise or splash"))
        if self.activation not in ("swiglu", "gelu", "geglu"):
            out.append(("activation", f"must be swiglu, gelu or geglu, got {self.activation!r}"))
        elif self.activation == "geglu" and self.num_experts > 0:
            out.append(("activation", "geglu is built for dense MLPs only; MoE experts take swiglu or gelu"))
        return out

    def rope_problems(self) -> list[tuple[str, str]]:
        """Checks of the RoPE scaling keys (as transformers' rope_config_validation, but errors)."""
        out = []
        if self.rope_scaling not in ("none", "linear", "llama3", "yarn"):
            out.append(("rope_scaling", f"must be none, linear, llama3 or yarn, got {self.rope_scaling!r}"))
        elif self.rope_scaling != "none" and self.position != "rope":
            out.append(("rope_scaling", f"{self.rope_scaling} scales RoPE, but position={self.position}"))
        for key in ("rope_scaling_factor", "rope_beta_fast", "rope_beta_slow", "rope_low_freq_factor"):
            if not getattr(self, key) > 0:
                out.append((key, f"must be > 0, got {getattr(self, key)}"))
        for key in ("rope_original_max_len", "rope_attention_factor", "rope_local_theta"):
            if not getattr(self, key) >= 0:
                out.append((key, f"must be >= 0 (0 = the default), got {getattr(self, key)}"))
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            out.append(("rope_high_freq_factor", f"llama3 RoPE scaling needs it > rope_low_freq_factor="
                        f"{self.rope_low_freq_factor}, got {self.rope_high_freq_factor}"))
        return out

    def moe_problems(self) -> list[tuple[str, str]]:
        """The Mixture-of-Experts keys' checks (none apply to a dense model but the signs)."""
        out = []
        if self.num_experts < 0:
            out.append(("num_experts", f"must be >= 0 (0 = dense), got {self.num_experts}"))
        if not self.capacity_factor > 0:
            out.append(("capacity_factor", f"must be > 0, got {self.capacity_factor}"))
        for key in ("aux_loss_coef", "z_loss_coef"):
            if not getattr(self, key) >= 0:
                out.append((key, f"must be >= 0, got {getattr(self, key)}"))
        if self.moe_matmul not in ("auto", "ragged_dot", "megablox", "tiled"):
            out.append(("moe_matmul",
                        f"must be auto, ragged_dot, megablox or tiled, got {self.moe_matmul!r}"))
        for key in ("first_dense_layers", "num_shared_experts", "expert_mlp_dim"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0, got {getattr(self, key)}"))
        if self.moe_every < 1:
            out.append(("moe_every", f"must be >= 1, got {self.moe_every}"))
        if out or not self.is_moe:
            return out
        if not 1 <= self.experts_per_token <= self.num_experts:
            out.append(("experts_per_token", f"must be in [1, num_experts={self.num_experts}], got "
                        f"{self.experts_per_token}"))
        moe_part = self.num_layers - self.first_dense_layers
        if moe_part < self.moe_every or moe_part % self.moe_every:
            out.append(("moe_every", f"the {moe_part} layers after first_dense_layers="
                        f"{self.first_dense_layers} must form whole groups of moe_every="
                        f"{self.moe_every} (each ends with an MoE layer)"))
        return out

    def router_problems(self) -> list[tuple[str, str]]:
        """Checks of the router keys: balancing, scaling and group-limited routing."""
        out = []
        modes = ("softmax_topk", "topk_softmax", "softmax_topk_unnormalized", "sigmoid_topk",
                 "sigmoid_topk_unnormalized")
        if self.router_mode not in modes:
            out.append(("router_mode", f"must be one of {', '.join(modes)}, got {self.router_mode!r}"))
        for key in ("seq_aux_loss_coef", "router_bias_rate", "mtp_loss_weight"):
            if not getattr(self, key) >= 0:
                out.append((key, f"must be >= 0, got {getattr(self, key)}"))
        if not self.routed_scaling_factor > 0:
            out.append(("routed_scaling_factor", f"must be > 0, got {self.routed_scaling_factor}"))
        if self.router_groups < 1:
            out.append(("router_groups", f"must be >= 1, got {self.router_groups}"))
        elif not 0 <= self.router_topk_groups <= self.router_groups:
            out.append(("router_topk_groups", f"must be in [0, router_groups={self.router_groups}], "
                        f"got {self.router_topk_groups}"))
        elif self.is_moe and self.num_experts % self.router_groups:
            out.append(("router_groups", f"num_experts={self.num_experts} is not divisible by "
                        f"router_groups={self.router_groups}"))
        elif self.is_moe and self.router_topk_groups and (
                self.router_topk_groups * self.num_experts // self.router_groups < self.experts_per_token):
            out.append(("router_topk_groups", f"{self.router_topk_groups} groups of "
                        f"{self.num_experts // self.router_groups} experts hold fewer than "
                        f"experts_per_token={self.experts_per_token}"))
        if self.mtp_depth < 0:
            out.append(("mtp_depth", f"must be >= 0 (0 = off), got {self.mtp_depth}"))
        return out

    def mla_problems(self) -> list[tuple[str, str]]:
        """Checks of multi-head latent attention's dimensions."""
        out = []
        if self.attention_type not in ("gqa", "mla"):
            return [("attention_type", f"must be gqa or mla, got {self.attention_type!r}")]
        for key in ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0, got {getattr(self, key)}"))
        if out or self.attention_type != "mla":
            return out
        for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim"):
            if getattr(self, key) < 1:
                out.append((key, f"attention_type=mla needs it >= 1, got {getattr(self, key)}"))
        if self.qk_rope_head_dim % 2:
            out.append(("qk_rope_head_dim", f"RoPE needs it even, got {self.qk_rope_head_dim}"))
        if self.position != "rope":
            out.append(("position", "attention_type=mla needs position=rope (its decoupled RoPE key)"))
        for key, what in (("qkv_bias", "q/k/v biases"), ("qk_norm", "per-head q/k norms"),
                          ("fused_projections", "a fused q/k/v matmul")):
            if getattr(self, key):
                out.append((key, f"attention_type=mla has no {what} (its keys and values come "
                            "from a normed latent): set it false"))
        return out

    @property
    def resolved_v_head_dim(self) -> int:
        """mla: the value heads' width (``v_head_dim``, 0 = ``qk_nope_head_dim``)."""
        return self.v_head_dim or self.qk_nope_head_dim
