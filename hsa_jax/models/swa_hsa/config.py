"""SWA+HSA model configuration: a typed, validated dataclass that speaks the original HF-style JSON.

Field names are the original `config.json` names (docs/model_math.md "SWA+HSA config fields"), so an
original config loads as is; fields the original reads but never uses (dropout rates, cache switches, token
ids other than pad) are accepted and ignored. A few JAX-side fields (`dtype`, `param_dtype`, `hsa_impl`) have
no original counterpart.
"""

from __future__ import annotations

import dataclasses

from hsa_jax.common.config import (HFConfigIO, nonneg_int, pos_int, pos_number, require, require_each,
                                   validate_transformer)

# Fields of original configs that the SWA+HSA stack reads but that do not change the maths
# (docs/model_math.md "SWA+HSA config fields", fixture README), or that belong to HF/Mamba machinery.
# Accepted silently.
IGNORED_FIELDS = frozenset({
    "architectures", "model_type", "torch_dtype", "transformers_version", "num_hidden_layers",
    "max_position_embeddings", "attention_dropout", "bos_token_id", "eos_token_id", "lmk_token_id",
    "residual_in_fp32", "flash_inference", "offloading_to_cpu", "inference_segment", "use_cache",
    "output_hidden_states", "use_return_dict", "return_dict", "enable_stable_enc", "block_q",
    "stick_breaking", "num_mamba_per_gca", "segment_size", "pretraining_tp", "mlp_bias",
})

@dataclasses.dataclass(frozen=True)
class SWAHSAConfig(HFConfigIO):
    IGNORED_FIELDS = IGNORED_FIELDS
    INFERENCE_FIELDS = frozenset({"dtype", "hsa_impl", "chunk_topk"})
    # Sizes.
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int  # kv heads of SWA layers and of the chunk encoder
    num_kv_heads: int  # kv heads of the HSA memory
    num_lower_layers: int
    num_upper_layers: int
    num_upper_groups: int = 1
    head_dim: int | None = None  # SWA head dim; HSA and encoder always use hidden/heads
    # Attention and norms.
    sliding_window: int | None = None  # SWA: query t sees keys t-W..t (W+1 keys)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    layer_norm_epsilon: float = 1e-5
    hidden_act: str = "silu"
    attention_bias: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    # Chunk memory and retrieval.
    chunk_size: int = 64
    chunk_topk: int = 8
    retrieval_dim: int | None = None  # default: hidden_size
    encoder_layers: int = 1
    enable_enc_cls: bool | None = None  # default: encoder_layers > 0
    enc_prenorm: bool = False
    encoder_dropout: float = 0.0
    singlehead_retrieval: bool = False
    enable_lmk_norm: bool = False
    enable_softmax: bool = False  # softmax chunk weights instead of stick-breaking
    enable_pos_decay: bool = False
    enable_gumbel_noise: bool = False
    mask_slide_window: bool = False
    slide_window: int = 0
    # HSA layer.
    enable_softmax1: bool = False  # sm_n = 1 inside each chunk's softmax
    enable_qk_norm: bool = False
    hsa_only: bool = True
    skip_hsa: bool = False
    hsa_sliding_window: int | None = None
    reset_hsa_residual: bool = False
    # JAX-side.
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    hsa_impl: str = "auto"  # one of IMPLS (pallas_kernels.hsa_attention backends)

    def __post_init__(self):
        fill = {}
        if self.head_dim is None and pos_int(self.hidden_size) and pos_int(self.num_attention_heads):
            fill["head_dim"] = self.hidden_size // self.num_attention_heads
        if self.retrieval_dim is None:
            fill["retrieval_dim"] = self.hidden_size
        if self.enable_enc_cls is None:
            fill["enable_enc_cls"] = isinstance(self.encoder_layers, int) and self.encoder_layers > 0
        for k, v in fill.items():
            object.__setattr__(self, k, v)
        self.validate()

    # ----- derived sizes -----
    @property
    def hsa_head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def retrieval_heads(self) -> int:
        return 1 if self.singlehead_retrieval else self.num_kv_heads

    @property
    def encoder_intermediate_size(self) -> int:
        # The original builds the encoder from a fresh LlamaConfig with this fixed width.
        return int(self.hidden_size * 8 / 3 // 64 * 64)

    @property
    def layers_per_group(self) -> int:
        return self.num_upper_layers // self.num_upper_groups

    @property
    def retrieval_window(self) -> int:
        return max(self.slide_window or 0, self.sliding_window or 0)

    @property
    def sm_n(self) -> float:
        return 1.0 if self.enable_softmax1 else 0.0

    def layer_kinds(self) -> list[str]:
        """Kinds of backbone.layers in order (the original single ModuleList)."""
        kinds = ["swa"] * self.num_lower_layers + ["chunking"]
        for _ in range(self.num_upper_groups):
            kinds += ["retrieval", "hsa"] + ["swa"] * self.layers_per_group
        return kinds

    # ----- validation -----
    def validate(self):
        require_each(self, ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                            "num_key_value_heads", "num_kv_heads", "num_upper_groups", "head_dim", "chunk_size",
                            "chunk_topk", "retrieval_dim"), pos_int, "a positive integer")
        require_each(self, ("num_lower_layers", "num_upper_layers", "encoder_layers", "slide_window"), nonneg_int,
                     "an integer >= 0")
        require(self.sliding_window is not None and pos_int(self.sliding_window), "sliding_window",
                 self.sliding_window, "a positive integer (the SWA window; it has no default)")
        validate_transformer(self, "hsa_impl")
        hq = self.num_attention_heads
        require(hq % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
                 f"a divisor of num_attention_heads={hq}")
        require(self.retrieval_dim % self.retrieval_heads == 0, "retrieval_dim", self.retrieval_dim,
                 f"a multiple of the retrieval heads ({self.retrieval_heads})")
        require(self.num_upper_layers % self.num_upper_groups == 0, "num_upper_layers",
                 self.num_upper_layers, f"a multiple of num_upper_groups={self.num_upper_groups}")
        require(self.head_dim % 2 == 0 and self.hsa_head_dim % 2 == 0, "head_dim", self.head_dim,
                 "even (rotary embedding), with hidden_size/num_attention_heads even too")
        require(self.partial_rotary_factor == 1.0, "partial_rotary_factor", self.partial_rotary_factor,
                 "1.0 (the original's rotary kernel rotates the whole head)")
        require_each(self, ("rms_norm_eps", "layer_norm_epsilon", "initializer_range", "rope_theta"), pos_number,
                     "a positive number")
        require(0.0 <= float(self.encoder_dropout) < 1.0, "encoder_dropout", self.encoder_dropout,
                 "a probability in [0, 1)")
        require(not (self.enable_enc_cls and self.encoder_layers == 0), "enable_enc_cls",
                 self.enable_enc_cls, "false when encoder_layers == 0 (the CLS landmark needs an encoder)")
        require(not (self.hsa_sliding_window is not None and self.hsa_only), "hsa_sliding_window",
                 self.hsa_sliding_window, "null unless hsa_only is false (it sets the HSA layer's own SWA window)")
        require(self.hsa_sliding_window is None or pos_int(self.hsa_sliding_window), "hsa_sliding_window",
                 self.hsa_sliding_window, "null or a positive integer")
        require(not self.mask_slide_window or self.retrieval_window >= self.chunk_size, "sliding_window",
                 self.retrieval_window, f">= chunk_size={self.chunk_size} when mask_slide_window is on "
                 "(otherwise a token could retrieve its own, still incomplete chunk)")

    def check_length(self, length: int):
        """Training-mode forwards need whole chunks."""
        if length % self.chunk_size:
            raise ValueError(
                f"input length {length} is not a multiple of chunk_size={self.chunk_size}; pad or crop "
                f"the sequence to a multiple of {self.chunk_size} (e.g. {length // self.chunk_size * self.chunk_size} "
                f"or {-(-length // self.chunk_size) * self.chunk_size})")


