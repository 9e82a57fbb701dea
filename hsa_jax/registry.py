"""Model families by name (`model_type` in run configs and checkpoints, `--model-type` in CLIs): the one
module that knows which families exist. A new family is a folder under hsa_jax/models/ plus one entry
in FAMILIES.

Every hook a tool needs lives on the ModelFamily:
    config_cls        from_dict/from_json/to_dict, chunk_size, vocab_size, check_length(T),
                      INFERENCE_FIELDS (what hsa-eval/hsa-generate overrides may change), IGNORED_FIELDS
    model_cls         Model(cfg, rngs=...); model(ids (N, T), train=, rng=, remat=, scan_layers=) -> logits
                      (N, T, V) fp32 aligned with the input tokens; with labels= (and loss_chunk=):
                      -> (log p(label) per token, valid mask); EMBED_KEY (original key of the embedding)
    make_decoder      (model, **options) -> the decoder interface of hsa_jax/common/decoding.py
    flops_per_token   (cfg, seq_len) -> training FLOPs per token (MFU)
    compare           (cfg, reference arrays, atol=) -> common.parity.Report (hsa-compare)
    compare_decode    (cfg, params, decode arrays, atol=, segment=) -> DecodeReport, or None
    from_original     (cfg, original state_dict) -> what common.interop.load_state_dict takes (checked)
    to_original       model -> the original state_dict (hsa-export)
    impl_field        the config field naming the attention backend (--impl of hsa-compare)
    tiny              the fields of a tiny config (smoke tests of every family: tests/test_registry.py)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from hsa_jax.common.config import ConfigError
from hsa_jax.common.interop import export_state_dict
from hsa_jax.models.drt.config import DRTConfig
from hsa_jax.models.drt.decode import DRTDecoder
from hsa_jax.models.drt.flops import drt_flops_per_token
from hsa_jax.models.drt.interop import export_original_state_dict, strip_buffers
from hsa_jax.models.drt.model import DRTForCausalLM
from hsa_jax.models.drt.parity import compare_drt_reference
from hsa_jax.models.swa_hsa.config import SWAHSAConfig
from hsa_jax.models.swa_hsa.decode import SWAHSADecoder
from hsa_jax.models.swa_hsa.flops import swa_hsa_flops_per_token
from hsa_jax.models.swa_hsa.model import SWAHSAForCausalLM
from hsa_jax.models.swa_hsa.parity import compare_decode_reference, compare_reference


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str
    config_cls: type
    model_cls: type
    make_decoder: Callable
    flops_per_token: Callable
    compare: Callable
    impl_field: str
    tiny: dict
    compare_decode: Callable | None = None
    from_original: Callable = lambda cfg, state_dict: state_dict
    to_original: Callable = export_state_dict

    @property
    def inference_fields(self) -> frozenset:
        return self.config_cls.INFERENCE_FIELDS


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (
    ModelFamily("swa_hsa", SWAHSAConfig, SWAHSAForCausalLM, SWAHSADecoder, swa_hsa_flops_per_token,
                compare_reference, "hsa_impl",
                dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                     num_kv_heads=1, num_lower_layers=1, num_upper_layers=1, chunk_size=16, chunk_topk=2,
                     encoder_layers=1, sliding_window=24, hsa_impl="xla"),
                compare_decode=compare_decode_reference),
    ModelFamily("drt", DRTConfig, DRTForCausalLM, DRTDecoder, drt_flops_per_token, compare_drt_reference,
                "gca_impl",
                dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                     decoder_layers=[1, 1], encoder_layers=1, enc_chunk_size=63, chunk_topk=2, chunk_id=60,
                     pad_id=59, slide_window=40, gca_impl="xla"),
                from_original=strip_buffers, to_original=export_original_state_dict),
)}


def family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ConfigError(f"config field model_type={name!r} is invalid: must be one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(model) -> ModelFamily:
    """The family of a model instance."""
    for fam in FAMILIES.values():
        if isinstance(model, fam.model_cls):
            return fam
    raise TypeError(f"{type(model).__name__} is not the model class of any registered family {sorted(FAMILIES)}")


def make_decoder(model, **options):
    """The cached decoder of a model of any family (options: segment_len, ... as that decoder takes)."""
    return family_of(model).make_decoder(model, **options)
