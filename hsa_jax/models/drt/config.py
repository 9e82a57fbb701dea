"""DRT (GCA) model configuration: a typed, validated dataclass that speaks the original HF-style JSON
(ant-research/long-context-modeling, config/DRT/*.json; docs/model_math.md "DRT config fields").

Field names are the original names, `_flash_attn_2_enabled` included, so an original config loads as
is. Fields the original reads but that do not change the maths (GPT-2 leftovers, unused switches, the
no-op `enable_softmax_one`, `_triton_gca` whose two GCA paths compute the same thing) are accepted and
ignored. `dtype`, `param_dtype` and `gca_impl` are JAX-side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hsa_jax.common.config import HFConfigIO, nonneg_int, pos_int, pos_number, require, require_each, validate_transformer

IGNORED_FIELDS = frozenset({
    "activation_function", "architectures", "bos_id", "mask_id", "max_position_embeddings", "model_type",
    "num_hidden_layers", "mask_probability", "torch_dtype", "transformers_version", "use_cache",
    "output_hidden_states", "hidden_dropout_prob", "chunk_window", "hcca_per_nlayers", "dec_chunk_size",
    "chunk_causal_window", "enable_causal_chunk_attn", "enable_softmax_one", "_triton_gca", "rope_theta",
    "eos_token_id", "bos_token_id", "pad_token_id",
})


@dataclasses.dataclass(frozen=True)
class DRTConfig(HFConfigIO):
    IGNORED_FIELDS = IGNORED_FIELDS
    INFERENCE_FIELDS = frozenset({"dtype", "gca_impl", "chunk_topk"})
    # Sizes.
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    decoder_layers: tuple[int, ...]  # [lower, upper group 1, ..., upper group G]
    encoder_layers: int
    num_key_value_heads: int | None = None  # decoder self-attention only (encoder and GCA are MHA)
    # Chunks and retrieval.
    enc_chunk_size: int = 63  # S real tokens per chunk; a landmark follows each chunk (P = S + 1)
    chunk_topk: int = 8
    chunk_id: int = 0  # landmark (LMK) token id
    pad_id: int = 0  # negative ids are embedded as pad_id; its embedding row gets no lookup gradient
    # Decoder self-attention.
    _flash_attn_2_enabled: bool = True  # True: ALiBi + sliding window; False: eager full-causal NoPE
    enable_alibi: bool = True
    slide_window: int = 512  # flash path: query t sees keys t-W..t (W+1 keys)
    # Norms, init, misc.
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    attention_bias: bool = False
    pretraining_tp: int = 1
    rope_scaling: dict | None = None
    # JAX-side.
    dtype: str = "float32"
    param_dtype: str = "float32"
    gca_impl: str = "auto"  # see pallas_kernels.gca.gca_attention

    def __post_init__(self):
        if isinstance(self.decoder_layers, list):
            object.__setattr__(self, "decoder_layers", tuple(self.decoder_layers))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        self.validate()

    # ----- derived sizes -----
    @property
    def chunk_size(self) -> int:
        """Granularity of valid input lengths (real tokens per chunk)."""
        return self.enc_chunk_size

    @property
    def lmk_chunk_size(self) -> int:
        """P: chunk length in the decoder stream (S tokens + the landmark)."""
        return self.enc_chunk_size + 1

    @property
    def zero_lmk_slot(self) -> bool:
        """P % 64 == 0: the landmark's chunk key/value is zeroed (an implicit softmax+1); else dropped."""
        return self.lmk_chunk_size % 64 == 0

    @property
    def chunk_kv_len(self) -> int:
        """Lk: keys per retrieved chunk."""
        return self.lmk_chunk_size if self.zero_lmk_slot else self.enc_chunk_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_lower_layers(self) -> int:
        return self.decoder_layers[0]

    @property
    def upper_group_layers(self) -> tuple[int, ...]:
        return self.decoder_layers[1:]

    @property
    def num_groups(self) -> int:
        return len(self.decoder_layers) - 1

    @property
    def window(self) -> int | None:
        """Decoder self-attention window, None for full causal attention (the eager path)."""
        return self.slide_window if self._flash_attn_2_enabled else None

    def alibi_slopes(self) -> list[float]:
        """The original's slopes m_h = 2^(-8(h+1)/H) (not the standard non-power-of-2 recipe)."""
        H = self.num_attention_heads
        return [2.0 ** (-8.0 * (h + 1) / H) for h in range(H)]

    # ----- validation -----
    def validate(self):
        require_each(self, ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                            "num_key_value_heads", "enc_chunk_size", "chunk_topk"), pos_int, "a positive integer")
        require(nonneg_int(self.encoder_layers), "encoder_layers", self.encoder_layers, "an integer >= 0")
        dl = self.decoder_layers
        require(isinstance(dl, tuple) and len(dl) >= 2 and nonneg_int(dl[0])
                 and all(pos_int(x) for x in dl[1:]), "decoder_layers", list(dl) if isinstance(dl, tuple) else dl,
                 "a list [lower, upper_1, ..., upper_G] with G >= 1 groups, lower >= 0 and each upper >= 1")
        require(self.lmk_chunk_size % 64 in (0, 1), "enc_chunk_size", self.enc_chunk_size,
                 "S with (S + 1) % 64 in (0, 1), e.g. 63 (landmark slot zeroed) or 64 (landmark slot dropped)")
        validate_transformer(self, "gca_impl")
        require(self.head_dim % 2 == 0, "hidden_size", self.hidden_size,
                 f"such that hidden_size / num_attention_heads is even (the encoder's RoPE); got {self.head_dim}")
        for name in ("chunk_id", "pad_id"):
            v = getattr(self, name)
            require(nonneg_int(v) and v < self.vocab_size, name, v, f"a token id in [0, vocab_size={self.vocab_size})")
        require_each(self, ("_flash_attn_2_enabled", "enable_alibi", "tie_word_embeddings", "attention_bias"),
                     lambda v: isinstance(v, bool), "true or false")
        require(not self._flash_attn_2_enabled or self.enable_alibi, "enable_alibi", self.enable_alibi,
                 "true when _flash_attn_2_enabled is true (without ALiBi the flash path's positions are undefined)")
        require(pos_int(self.slide_window), "slide_window", self.slide_window, "a positive integer")
        require(self.tie_word_embeddings is True, "tie_word_embeddings", self.tie_word_embeddings,
                 "true (DRT ties lm_head to embed_tokens)")
        require(self.attention_bias is False, "attention_bias", self.attention_bias, "false (DRT has no biases)")
        require(self.pretraining_tp == 1, "pretraining_tp", self.pretraining_tp, "1")
        require_each(self, ("rms_norm_eps", "initializer_range"), pos_number, "a positive number")

    def check_length(self, length: int):
        """Batch forwards take whole chunks of S real tokens (the landmarks are inserted inside)."""
        S = self.enc_chunk_size
        if length <= 0 or length % S:
            raise ValueError(
                f"input length {length} is not a positive multiple of enc_chunk_size={S}; pad or crop the "
                f"sequence to a multiple of {S} (e.g. {max(length // S, 1) * S} or {max(-(-length // S), 1) * S})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decoder_layers"] = list(self.decoder_layers)
        return d

