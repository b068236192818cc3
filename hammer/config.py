"""The one model config both backends build from, read from and written to HF `config.json`.

Architecture only: mesh, sharding rules, optimizer and runtime choices (dtypes, attention kernel,
scan over layers) live with the code that uses them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hammer.errors import HammerError


class ConfigError(HammerError):
    """A config value that hammer cannot build a Llama from."""


_ARCHITECTURE = "LlamaForCausalLM"
# HF keys that describe a Llama this project does not implement, with the value that it does.
_REQUIRED_VALUES = {
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads, as HF derives it
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim must be a positive even integer (RoPE rotates pairs), "
                              f"got {self.head_dim!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} {value} is outside the vocabulary [0, {self.vocab_size})")

    # Derived sizes.
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def param_count(self, *, embeddings: bool = True) -> int:
        """Parameters as HF counts them (a tied head counted once)."""
        h = self.hidden_size
        attention = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        total = self.num_layers * per_layer + h
        if embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        elif not self.tie_word_embeddings:
            total += self.vocab_size * h  # the head is a matmul, not a lookup
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), PaLM's 6N + 12·L·H·T convention."""
        return 6 * self.param_count(embeddings=False) + 12 * self.num_layers * self.q_size * seq_len

    # HF config.json.
    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any]) -> "ModelConfig":
        """From an HF model directory, a config.json path, or its parsed dict."""
        if isinstance(source, Mapping):
            hf, where = dict(source), "config"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"no config.json at {path}")
            try:
                hf = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
            where = str(path)
        return cls._from_hf_dict(hf, where)

    @classmethod
    def _from_hf_dict(cls, hf: dict[str, Any], where: str) -> "ModelConfig":
        architectures = hf.get("architectures") or [_ARCHITECTURE]
        if architectures != [_ARCHITECTURE]:
            raise ConfigError(f"{where}: architectures is {architectures}, expected ['{_ARCHITECTURE}']")
        for key, expected in _REQUIRED_VALUES.items():
            if key in hf and hf[key] != expected:
                raise ConfigError(f"{where}: {key} is {hf[key]!r}, only {expected!r} is supported")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in hf]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        num_heads = hf["num_attention_heads"]
        num_kv_heads = hf.get("num_key_value_heads")  # null or absent: one per query head
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=num_heads if num_kv_heads is None else num_kv_heads,
                head_dim=hf.get("head_dim") or 0,
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                rms_norm_eps=_float(hf, "rms_norm_eps", 1e-6),  # LlamaConfig's default
                rope_theta=_rope_theta(hf),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                initializer_range=_float(hf, "initializer_range", 0.02),
                bos_token_id=hf.get("bos_token_id", 1),
                eos_token_id=_single_id(hf.get("eos_token_id", 2), "eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """A config.json dict that transformers 4 and 5 both load as this `LlamaConfig`."""
        hf = {
            "architectures": [_ARCHITECTURE],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            # transformers 4's spelling, which 5 reads too (into rope_parameters). A rope_parameters
            # entry here would reach llama.cpp's converter (transformers 4) as an unknown RoPE type.
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if dtype is not None:
            hf["torch_dtype"] = dtype
            hf["dtype"] = dtype
        return hf

    def save(self, path: str | os.PathLike, dtype: str | None = None) -> None:
        """Writes config.json into directory `path`."""
        (Path(path) / "config.json").write_text(json.dumps(self.to_hf(dtype), indent=2) + "\n")

    def differences(self, other: "ModelConfig") -> list[tuple[str, Any, Any]]:
        """(field, this value, other's value) of every field where the two configs differ."""
        return [(f.name, getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    def replace(self, **changes: Any) -> "ModelConfig":
        if "hidden_size" in changes or "num_heads" in changes:
            changes.setdefault("head_dim", 0)
        return dataclasses.replace(self, **changes)


def _rope_theta(hf: dict[str, Any]) -> float:
    """transformers 5 writes rope_parameters, 4 wrote rope_theta (+ rope_scaling), old Llama neither."""
    theta = _float(hf, "rope_theta", 10000.0)
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key) or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope scaling {rope_type!r} is not supported, only plain RoPE")
        theta = _float(params, "rope_theta", theta)
    return theta


def _float(hf: Mapping[str, Any], key: str, default: float) -> float:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _single_id(value: Any, name: str) -> int | None:
    if isinstance(value, list):
        if len(value) != 1:
            raise ConfigError(f"{name} {value} lists several ids, expected one")
        return value[0]
    return value
