"""What every model family's config shares: the error type, YAML/JSON value typing, HF-style JSON I/O,
field validators, and the `key=value` override syntax of every CLI.

An override is `section.field=value`, or `field=value` when exactly one section has that field; the
value is read as YAML (`1e-3`, `true`, `[1, 2]`, `null`) and then typed by the field it lands in.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
import typing
import warnings
from typing import Any

import yaml

DTYPES = ("float32", "bfloat16", "float16")
# Attention backends of the HSA and GCA ops (pallas_kernels: auto = Pallas on GPU, the XLA reference
# elsewhere; interpret = the Pallas kernels in interpreter mode).
IMPLS = ("auto", "xla", "pallas", "interpret")


class ConfigError(ValueError):
    """A config field has a bad value. The message names the field, the value and what is allowed."""


def typed_fields(cls, values: dict[str, Any], section: str, ignored: frozenset = frozenset()) -> dict[str, Any]:
    """The fields of dataclass `cls` from `values`, numbers converted to the declared type: YAML 1.1 reads
    `1e-3` as a string, and `lr: 1` as an int. An unknown key is an error naming its close matches
    (keys in `ignored` are dropped silently); a value of the wrong kind names the field."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        if key in ignored:
            continue
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; allowed: {sorted(hints)}"
            raise ConfigError(f"unknown config field {section}.{key}{hint}")
        kind = hints[key]
        try:
            if kind is float and isinstance(value, (str, int)) and not isinstance(value, bool):
                value = float(value)
            elif kind is int and isinstance(value, (str, float)) and not isinstance(value, bool):
                number = float(value)
                value = int(number) if number.is_integer() else value  # 1e2 is 100; 2.5 stays wrong
        except ValueError:
            raise ConfigError(f"config field {section}.{key}={value!r} is invalid: must be a number "
                              f"({kind.__name__})") from None
        wrong = ((kind is float and not isinstance(value, float)) or (kind is bool and not isinstance(value, bool))
                 or (kind is int and (not isinstance(value, int) or isinstance(value, bool))))
        if wrong:
            raise ConfigError(f"config field {section}.{key}={value!r} is invalid: must be {kind.__name__}")
        out[key] = value
    return out


class HFConfigIO:
    """I/O shared by the model-config dataclasses: original HF-style JSON in and out. A subclass sets
    IGNORED_FIELDS: original fields that are accepted and dropped; other unknown fields warn."""

    IGNORED_FIELDS: frozenset = frozenset()
    # Fields a trained model may change at inference (no parameter depends on them): the `key=value`
    # overrides of hsa-eval / hsa-generate.
    INFERENCE_FIELDS: frozenset = frozenset()

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides):
        d = {**d, **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - cls.IGNORED_FIELDS)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown config fields {unknown}", stacklevel=2)
        kwargs = {k: v for k, v in d.items() if k in known}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in kwargs]
        if missing:
            raise ConfigError(f"config is missing required fields {missing}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | pathlib.Path, **overrides):
        try:
            data = json.loads(pathlib.Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from e
        return cls.from_dict(data, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def with_overrides(self, items, allowed: frozenset | None = None):
        """This config with `key=value` overrides applied (the CLI syntax, `model.` prefix optional),
        restricted to `allowed` field names when given (INFERENCE_FIELDS for a trained model)."""
        changes = {}
        for item in items:
            key, value = split_override(item)
            key = key.removeprefix("model.")
            if allowed is not None and key not in allowed:
                raise ConfigError(f"override '{key}' cannot change at inference; allowed: {', '.join(sorted(allowed))}")
            try:
                changes.update(typed_fields(type(self), {key: value}, "model"))
            except ConfigError:
                kind = typing.get_type_hints(type(self)).get(key)
                if kind is None:
                    raise
                raise ConfigError(f"override '{item.strip()}': expected a value of type "
                                  f"{getattr(kind, '__name__', kind)}") from None
        return self.replace(**changes)

    def with_inference_settings(self, items):
        """Overrides limited to the fields no parameter depends on (hsa-eval / hsa-generate)."""
        return self.with_overrides(items, self.INFERENCE_FIELDS)


def split_override(item: str) -> tuple[str, Any]:
    """"key=value" -> (key, the value read as YAML)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not key=value")
    try:
        return key.strip(), yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None


def apply_overrides(raw: dict[str, Any], items, sections: dict[str, set[str]]) -> dict[str, Any]:
    """Applies `section.field=value` / `field=value` overrides to a nested config dict (a copy).
    sections: section name -> its field names ("" for top-level keys); a bare field must belong to
    exactly one section."""
    raw = {k: (dict(v or {}) if k in sections and k else v) for k, v in raw.items()}
    for item in items:
        key, value = split_override(item)
        if "." in key:
            section, field = key.split(".", 1)
        else:
            owners = [s for s, fields in sections.items() if key in fields]
            if len(owners) != 1:
                where = f"found in sections {owners}" if owners else "no section has it"
                raise ConfigError(f"override '{key}': {where}; write it as section.{key}")
            section, field = owners[0], key
        if section:
            raw.setdefault(section, {})[field] = value
        else:
            raw[field] = value
    return raw


def pos_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def nonneg_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def require(ok: bool, field: str, value, allowed: str):
    if not ok:
        raise ConfigError(f"config field {field}={value!r} is invalid: must be {allowed}")


def pos_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def require_each(cfg, names, check, allowed: str):
    """`require(check(value))` for each of the named fields of cfg."""
    for name in names:
        value = getattr(cfg, name)
        require(check(value), name, value, allowed)


def validate_transformer(cfg, impl_field: str):
    """The checks every model family's config makes (after its sizes are known to be positive): heads that
    divide hidden_size, kv heads that divide the heads, a SwiGLU MLP, the default rotary embedding only,
    known dtypes, and a known attention backend in the field `impl_field`."""
    hq = cfg.num_attention_heads
    require(cfg.hidden_size % hq == 0, "hidden_size", cfg.hidden_size, f"a multiple of num_attention_heads={hq}")
    require(hq % cfg.num_key_value_heads == 0, "num_key_value_heads", cfg.num_key_value_heads,
            f"a divisor of num_attention_heads={hq}")
    require(cfg.hidden_act in ("silu", "swish"), "hidden_act", cfg.hidden_act, "'silu' or 'swish'")
    require(cfg.rope_scaling is None, "rope_scaling", cfg.rope_scaling,
            "null (only the default rotary embedding is implemented)")
    require_each(cfg, ("dtype", "param_dtype"), lambda v: v in DTYPES, f"one of {DTYPES}")
    impl = getattr(cfg, impl_field)
    require(impl in IMPLS, impl_field, impl, f"one of {IMPLS}")
