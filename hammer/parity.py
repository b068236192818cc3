"""Parity of a checkpoint and its conversion: logits, loss on a batch and greedy generation of the
JAX model, the torch twin and transformers, each against one reference run.

The reference is transformers in float32 on the first HF directory given (SRC, else DST), or the twin
in float32 on SRC when neither is an HF directory. float32 runs must stay within fixed relative bounds
of it and generate the same tokens. A bfloat16 run is bounded by the reference backend's own bfloat16
error (the same backend, directory and batch in bfloat16: max-abs of the logits, mean per-token error
of the loss), times BF16_SLACK, as tests/test_convert.py bounds the JAX model: rounding to 8 mantissa
bits is a loss every backend pays, a wrong conversion is not. bfloat16 greedy tokens are reported but not required to match: a near-tie may flip.

The backends are imported inside the functions that run them; this module imports neither.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hammer.config import ModelConfig
from hammer.errors import HammerError

BACKENDS = ("hf", "jax", "torch")
BACKEND_NAMES = {"hf": "transformers", "jax": "hammer_jax", "torch": "hammer_torch"}
DTYPES = ("float32", "bfloat16")
# float32 bounds, relative to the reference: logits max-abs / max |reference logit|, and
# |loss - reference loss| / reference loss. The tests measure 3.6e-6 max-abs (JAX, logits of ~5)
# and 1.2e-7 relative loss; a weight scaled by 1.01 moves either by 1e-3 or more.
FLOAT32_LOGITS_RTOL = 1e-4
FLOAT32_LOSS_RTOL = 1e-5
# bfloat16 bound = BF16_SLACK x the reference backend's own bfloat16 error (luck of which roundings line up).
BF16_SLACK = 1.5


class ParityError(HammerError):
    """A parity request that cannot run: directories of two different models, a bad batch shape."""


@dataclass(frozen=True)
class Batch:
    """Token ids [b, s] scored by every run, and the prompt each run continues greedily."""

    ids: np.ndarray
    prompt: list[int]
    source: str  # how the ids were made, for the report


@dataclass(frozen=True)
class Run:
    backend: str
    directory: Path
    dtype: str

    def label(self, names: dict[Path, str]) -> str:
        return f"{BACKEND_NAMES[self.backend]} {self.dtype} on {names[self.directory]}"


@dataclass(frozen=True)
class Outputs:
    logits: np.ndarray  # float32 [b, s, vocab]
    loss: float  # mean next-token NLL of the batch, by the backend's own loss code
    tokens: list[int]  # greedy continuation of the prompt, EOS included when it stops there


@dataclass(frozen=True)
class Row:
    """One run against the reference; the bounds are on the max-abs differences."""

    run: Run
    logits_max_abs: float
    logits_rel: float
    logits_bound: float
    loss: float
    loss_abs: float
    loss_rel: float
    loss_bound: float
    tokens: list[int]
    tokens_matched: int  # length of the prefix shared with the reference's tokens
    tokens_identical: bool
    tokens_required: bool

    @property
    def ok(self) -> bool:
        return (self.logits_max_abs <= self.logits_bound and self.loss_abs <= self.loss_bound
                and (self.tokens_identical or not self.tokens_required))

    def to_json(self, names: dict[Path, str]) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "run"}
        return {"backend": BACKEND_NAMES[self.run.backend], "directory": names[self.run.directory],
                "dtype": self.run.dtype, **fields, "ok": self.ok}


@dataclass(frozen=True)
class ParityResult:
    directories: dict[Path, str]  # path -> "SRC" / "DST"
    reference: Run
    reference_tokens: list[int]
    batch: Batch
    rows: list[Row]

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    def table(self) -> str:
        names = self.directories
        b, s = self.batch.ids.shape
        lines = [f"{name}: {path}" for path, name in names.items()]
        lines += [f"batch: {b} x {s} token ids ({self.batch.source}); greedy continuation of a "
                  f"{len(self.batch.prompt)}-token prompt, {len(self.reference_tokens)} tokens by the reference",
                  f"reference: {self.reference.label(names)}",
                  f"bounds: float32 logits {FLOAT32_LOGITS_RTOL:g} x max|logit|, loss {FLOAT32_LOSS_RTOL:g} "
                  f"relative, greedy token-identical; bfloat16 {BF16_SLACK:g} x the reference backend's "
                  f"own bfloat16 error (logits max-abs; loss: mean per-token)", ""]
        header = ("backend", "dir", "dtype", "logits max-abs", "rel", "bound", "loss", "abs", "rel",
                  "bound", "greedy", "")
        cells = [header] + [(BACKEND_NAMES[r.run.backend], names[r.run.directory], r.run.dtype,
                             f"{r.logits_max_abs:.3g}", f"{r.logits_rel:.2g}", f"{r.logits_bound:.2g}",
                             f"{r.loss:.6g}", f"{r.loss_abs:.3g}", f"{r.loss_rel:.2g}", f"{r.loss_bound:.2g}",
                             f"{r.tokens_matched}/{len(self.reference_tokens)}"
                             + ("" if r.tokens_identical else " differ") + ("" if r.tokens_required else " *"),
                             "ok" if r.ok else "FAIL") for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        lines += ["", "greedy: tokens agreeing with the reference's before the first difference "
                      "(* not required: bfloat16)",
                  "parity: ok" if self.ok else "parity: FAILED"]
        return "\n".join(lines)

    def to_json(self) -> dict:
        names = self.directories
        return {
            "directories": {name: str(path) for path, name in names.items()},
            "reference": {"backend": BACKEND_NAMES[self.reference.backend],
                          "directory": names[self.reference.directory], "dtype": self.reference.dtype,
                          "tokens": self.reference_tokens},
            "batch": {"shape": list(self.batch.ids.shape), "source": self.batch.source,
                      "prompt": self.batch.prompt},
            "tolerances": {"float32_logits_rel": FLOAT32_LOGITS_RTOL, "float32_loss_rel": FLOAT32_LOSS_RTOL,
                           "bfloat16_slack": BF16_SLACK},
            "rows": [row.to_json(names) for row in self.rows],
            "ok": self.ok,
        }


def read_config(directories: list[Path]) -> ModelConfig:
    """The one config every directory holds: a conversion changes the format, never the model."""
    from convert import model_dir

    configs = [ModelConfig.from_hf(model_dir(d)) for d in directories]
    for d, config in zip(directories[1:], configs[1:]):
        if config != configs[0]:
            differ = [f"{name} {a!r} vs {b!r}" for name, a, b in configs[0].differences(config)]
            raise ParityError(f"{directories[0]} and {d} hold different models: {'; '.join(differ)}")
    return configs[0]


def make_batch(config: ModelConfig, *, tokenizer=None, text: str | None = None, seed: int = 0,
               batch_size: int = 2, seq_len: int = 32) -> Batch:
    """`text` through `tokenizer` (one row), else seeded random ids [batch_size, seq_len]; the
    prompt is the first row."""
    if text is not None:
        ids = tokenizer.encode(text)
        if len(ids) < 2:
            raise ParityError(f"--text {text!r} is {len(ids)} token(s); the loss needs at least 2")
        if len(ids) > config.max_position_embeddings:
            raise ParityError(f"--text is {len(ids)} tokens, more than the model's context of "
                              f"{config.max_position_embeddings}")
        return Batch(np.asarray([ids], np.int32), list(ids), f"--text through {tokenizer.name}")
    if batch_size < 1:
        raise ParityError(f"--batch-size must be >= 1, got {batch_size}")
    if not 2 <= seq_len <= config.max_position_embeddings:
        raise ParityError(f"--seq-len must be in [2, {config.max_position_embeddings}] (the model's "
                          f"context), got {seq_len}")
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (batch_size, seq_len), dtype=np.int32)
    return Batch(ids, ids[0].tolist(), f"random, seed {seed}")


def runs(directories: list[Path], dtypes: tuple[str, ...]) -> list[Run]:
    """Every backend on every directory it reads (transformers reads only HF directories), each dtype."""
    from convert import is_hf_dir, model_dir

    return [Run(backend, d, dtype) for dtype in dtypes for d in directories for backend in BACKENDS
            if backend != "hf" or is_hf_dir(model_dir(d))]


def reference_run(directories: list[Path]) -> Run:
    from convert import is_hf_dir, model_dir

    hf = [d for d in directories if is_hf_dir(model_dir(d))]
    return Run("hf", hf[0], "float32") if hf else Run("torch", directories[0], "float32")


def check_parity(directories: dict[Path, str], batch: Batch, *, dtypes: tuple[str, ...] = ("float32",),
                 max_new_tokens: int = 16, eos_id: int | None = None) -> ParityResult:
    """Runs every backend on every directory in every dtype and compares each with the reference."""
    paths = list(directories)
    reference = reference_run(paths)
    todo = runs(paths, dtypes)
    outputs = {run: run_backend(run, batch, max_new_tokens, eos_id) for run in todo}
    ref = outputs[reference]
    scale = float(np.abs(ref.logits).max())
    bounds = {"float32": (FLOAT32_LOGITS_RTOL * scale, FLOAT32_LOSS_RTOL * abs(ref.loss))}
    if "bfloat16" in dtypes:
        own = outputs[dataclasses.replace(reference, dtype="bfloat16")]
        # The loss bound takes the mean per-token error, not the error of the mean: the latter is a
        # sum of signed roundings that may cancel by luck in the reference's run and not in another.
        token_error = np.abs(_token_nll(own.logits, batch.ids) - _token_nll(ref.logits, batch.ids)).mean()
        bounds["bfloat16"] = (BF16_SLACK * _max_abs(own.logits, ref.logits), BF16_SLACK * float(token_error))
    rows = [_row(run, out, ref, scale, *bounds[run.dtype]) for run, out in outputs.items()]
    return ParityResult(directories, reference, ref.tokens, batch, rows)


def _row(run: Run, out: Outputs, ref: Outputs, scale: float, logits_bound: float, loss_bound: float) -> Row:
    logits_abs = _max_abs(out.logits, ref.logits)
    loss_abs = abs(out.loss - ref.loss)
    matched = next((i for i, (a, b) in enumerate(zip(out.tokens, ref.tokens)) if a != b),
                   min(len(out.tokens), len(ref.tokens)))
    return Row(run, logits_abs, logits_abs / scale, logits_bound, out.loss, loss_abs,
               loss_abs / abs(ref.loss), loss_bound, out.tokens, matched, out.tokens == ref.tokens,
               tokens_required=run.dtype == "float32")


def _token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """-log p(ids[:, j+1] | ids[:, :j+1]) from the logits, in float64."""
    z = logits[:, :-1].astype(np.float64)
    top = z.max(-1, keepdims=True)
    log_norm = top[..., 0] + np.log(np.exp(z - top).sum(-1))
    return log_norm - np.take_along_axis(z, ids[:, 1:, None].astype(np.int64), -1)[..., 0]


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    diff = float(np.abs(a.astype(np.float64) - b).max())
    return diff if not math.isnan(diff) else math.inf


def run_backend(run: Run, batch: Batch, max_new_tokens: int, eos_id: int | None) -> Outputs:
    """Logits, loss and greedy tokens of one backend on one directory in one dtype."""
    return {"jax": _run_jax, "torch": _run_twin, "hf": _run_transformers}[run.backend](
        run.directory, run.dtype, batch, max_new_tokens, eos_id)


def _greedy(step, batch: Batch, max_new_tokens: int, eos_id: int | None) -> list[int]:
    from hammer.sampling import Sampler, generate

    return generate(step, batch.prompt, max_new_tokens=max_new_tokens, sampler=Sampler(0.0), eos_id=eos_id)


def _run_jax(directory: Path, dtype: str, batch: Batch, max_new_tokens: int, eos_id: int | None) -> Outputs:
    import jax.numpy as jnp

    import hammer_jax
    from hammer_jax.generate import JaxStepper
    from hammer_jax.scorer import JaxScorer

    model = hammer_jax.from_pretrained(directory, dtype=getattr(jnp, dtype))
    logits = np.asarray(_jax_forward()(model, jnp.asarray(batch.ids)), np.float32)
    loss = float(JaxScorer(model).token_nll(batch.ids).astype(np.float64).mean())
    step = JaxStepper(model, len(batch.prompt) + max_new_tokens)
    return Outputs(logits, loss, _greedy(step, batch, max_new_tokens, eos_id))


@functools.cache
def _jax_forward():
    """One jitted forward for every run, so SRC and DST of one structure compile once."""
    from flax import nnx

    return nnx.jit(lambda model, ids: model(ids))


def _torch_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_twin(directory: Path, dtype: str, batch: Batch, max_new_tokens: int, eos_id: int | None) -> Outputs:
    import torch

    import hammer_torch
    from hammer_torch.generate import TorchStepper

    model = hammer_torch.from_pretrained(directory, dtype=getattr(torch, dtype)).to(_torch_device())
    ids = torch.from_numpy(batch.ids.astype(np.int64)).to(_torch_device())
    with torch.inference_mode():
        logits = model(ids).float().cpu().numpy()
        loss = float(hammer_torch.causal_lm_loss(model, ids))
    step = TorchStepper(model, len(batch.prompt) + max_new_tokens)
    return Outputs(logits, loss, _greedy(step, batch, max_new_tokens, eos_id))


def _run_transformers(directory: Path, dtype: str, batch: Batch, max_new_tokens: int,
                      eos_id: int | None) -> Outputs:
    import torch
    from transformers import AutoModelForCausalLM

    from convert import model_dir

    model = AutoModelForCausalLM.from_pretrained(model_dir(directory), dtype=getattr(torch, dtype))
    model = model.to(_torch_device()).eval()
    ids = torch.from_numpy(batch.ids.astype(np.int64)).to(_torch_device())
    with torch.inference_mode():
        out = model(ids, labels=ids)
        prompt = torch.tensor([batch.prompt], device=ids.device)
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                                   pad_token_id=eos_id if eos_id is not None else 0)
    return Outputs(out.logits.float().cpu().numpy(), float(out.loss),
                   generated[0, len(batch.prompt):].tolist())
