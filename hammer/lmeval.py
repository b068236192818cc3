"""hammer as an lm-evaluation-harness model: `HammerLM` answers lm-eval's three requests
(`loglikelihood`, `loglikelihood_rolling`, `generate_until`) with any hammer scorer and KV-cache
stepper, on the JAX model or the torch twin, without converting it. Importing this module registers
it with lm-eval as `hammer` (lm-eval 0.4 loads no plugins by itself, so `python -m hammer.lmeval`
is its `lm_eval` command with `hammer` registered).

It does what lm-eval's own `hf` model does with `add_bos_token=False` (the default here), so the two
give the same numbers on the HF export of a model: contexts and continuations are encoded without
BOS, an empty context is BOS alone, a sequence longer than the context keeps its last
`max_length + 1` tokens, rolling windows are lm-eval's own (`get_rolling_token_windows`), and
generation is greedy unless the task samples, cut at the task's stop strings and EOS.
Log-likelihoods are computed in batches of similar length; generation runs a request at a time
through the KV cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from hammer.eval import EvalError, Scorer, length_batches
from hammer.sampling import Sampler, generate

BACKENDS = ("jax", "torch")
DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf model's, for tasks that set none
MODEL_ARGS = {"pretrained", "backend", "dtype", "tokenizer", "batch_size", "add_bos_token"}



class Stepper(Protocol):
    """`hammer_jax.generate.JaxStepper`, `hammer_torch.generate.TorchStepper`."""

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        """Logits of the last of `ids`, read after every id since the last reset."""

    def reset(self) -> None: ...


# `new_stepper(max_len)` -> a stepper over a KV cache of max_len positions.
NewStepper = Callable[[int], Stepper]


class ScoresGreedy(Scorer, Protocol):
    def token_scores(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(`token_nll`, bool `[b, s-1]`: whether each next id is the argmax)."""


@register_model("hammer")
class HammerLM(TemplateLM):
    """An lm-eval `LM` over a scorer (`token_scores`) and, for generation, a stepper factory."""

    def __init__(self, scorer: ScoresGreedy, tokenizer, *, new_stepper: NewStepper | None = None,
                 batch_size: int = 8, add_bos_token: bool = False):
        super().__init__()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise EvalError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.scorer, self.tokenizer, self.new_stepper = scorer, tokenizer, new_stepper
        self._batch_size, self.add_bos_token = batch_size, bool(add_bos_token)
        self._stepper: Stepper | None = None  # one cache of the model's context, reset per request

    @classmethod
    def from_pretrained(cls, pretrained: str | Path, *, backend: str = "jax", dtype: str = "float32",
                        tokenizer: str | Path | None = None, batch_size: int = 8,
                        add_bos_token: bool = False) -> "HammerLM":
        """A model directory hammer reads (HF, a JAX or torch run or checkpoint) on `backend`."""
        from convert import model_dir
        from hammer.config import ModelConfig
        from hammer.tokenizer import Tokenizer

        if backend not in BACKENDS:
            raise EvalError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        if dtype not in DTYPES:
            raise EvalError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        path = Path(pretrained)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} not found")
        files = model_dir(path)  # a JAX step keeps config.json and the tokenizer in its run directory
        tok = Tokenizer.from_pretrained(tokenizer or files)
        tok.check_fits(ModelConfig.from_hf(files).vocab_size, str(path))
        scorer, new_stepper = load_backend(backend, path, dtype)
        return cls(scorer, tok, new_stepper=new_stepper, batch_size=batch_size, add_bos_token=add_bos_token)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "HammerLM":
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "HammerLM":
        """`--model_args pretrained=DIR,backend=jax,dtype=float32,tokenizer=DIR,add_bos_token=False`.

        Of lm-eval's own options only batch_size applies: JAX runs on its devices and torch on CUDA
        when present, whatever --device says (lm_eval passes cuda:0 unless told).
        """
        args = dict(arg_dict)
        unknown = sorted(set(args) - MODEL_ARGS)
        if unknown:
            raise EvalError(f"model_args: unknown key {unknown[0]!r}, expected {', '.join(sorted(MODEL_ARGS))}")
        if "pretrained" not in args:
            raise EvalError("model_args: expected pretrained=DIR (a model directory hammer reads)")
        batch_size = (additional_config or {}).get("batch_size")
        if batch_size is not None:
            args.setdefault("batch_size", batch_size)
        if isinstance(args.get("batch_size"), str):  # lm_eval's --batch_size is a string ('8', 'auto')
            if not args["batch_size"].isdigit():
                raise EvalError(f"batch_size {args['batch_size']!r}: hammer takes a positive integer")
            args["batch_size"] = int(args["batch_size"])
        return cls.from_pretrained(args.pop("pretrained"), **args)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_special_tokens=add)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether each of its tokens is the argmax)."""
        ids = [(list(context) + list(continuation))[-(self.max_length + 1):]
               for _, context, continuation in requests]
        scored = [len(continuation) for _, _, continuation in requests]
        out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        # A sequence takes max_length + 1 ids: the last is only predicted, never read.
        for rows, batch, lengths in length_batches(ids, self.batch_size, self.max_length + 1,
                                                   self.scorer.fixed_shapes):
            nll, greedy = self.scorer.token_scores(batch)
            for r, i in enumerate(rows):
                end = int(lengths[r]) - 1
                span = slice(end - scored[i], end)
                out[i] = (-float(np.asarray(nll[r, span], np.float64).sum()), bool(greedy[r, span].all()))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over every token: BOS as the first context, then windows of
        the model's context each scoring the tokens the previous ones did not."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = np.zeros(len(requests), np.float64)
        np.add.at(totals, owner, [ll for ll, _ in self._loglikelihood_tokens(windows)])
        return totals.tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.new_stepper is None:
            raise EvalError("generate_until tasks need a model that generates: this HammerLM was built "
                            "from a scorer alone (pass new_stepper)")
        eos_text = self.tokenizer.special.eos_token
        return [self._generate(context, gen_kwargs, eos_text) for context, gen_kwargs in
                (req.args for req in requests)]

    def _generate(self, context: str, gen_kwargs: dict, eos_text: str | None) -> str:
        kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen_toks = kwargs.pop("max_gen_toks")
        if max_gen_toks >= self.max_length:
            raise EvalError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in the model's "
                            f"context of {self.max_length}")
        # An empty context starts from BOS, as a loglikelihood request's does.
        prompt = self.tok_encode(context)[-(self.max_length - max_gen_toks):] or [self.prefix_token_id]
        sampler = (Sampler(kwargs.get("temperature", 1.0), kwargs.get("top_p", 1.0), kwargs.get("seed", 0))
                   if kwargs.get("do_sample") else Sampler(0.0))
        if self._stepper is None:
            self._stepper = self.new_stepper(self.max_length)
        self._stepper.reset()
        stepper = _in_power_of_two_pieces(self._stepper) if self.scorer.fixed_shapes else self._stepper

        def step(ids):  # rows past the tokenizer's ids (vocab padding) were never trained and cannot be decoded
            return stepper(ids)[: self.tokenizer.vocab_size]

        stops = [s for s in until if s]

        def reached_stop(new: list[int]) -> bool:
            text = self.tokenizer.decode(new)
            return any(s in text for s in stops)

        new = generate(step, prompt, max_new_tokens=max_gen_toks, sampler=sampler,
                       eos_id=self.eot_token_id, stop=reached_stop)
        return postprocess_generated_text(self.tokenizer.decode(new), until, None)


def _in_power_of_two_pieces(step):
    """A jitted step compiles once per input length: a prompt fed in pieces of 2^k tokens (37 = 32 +
    4 + 1) costs a handful of compilations over a whole task instead of one per prompt length."""

    def pieces(ids: Sequence[int]) -> np.ndarray:
        start, logits = 0, None
        while start < len(ids):
            size = 1 << ((len(ids) - start).bit_length() - 1)
            logits = step(ids[start:start + size])
            start += size
        return logits

    return pieces


def load_backend(backend: str, path: Path, dtype: str) -> tuple[ScoresGreedy, NewStepper]:
    """The backend's scorer and stepper factory over one copy of the model at `path`."""
    if backend == "jax":
        import jax.numpy as jnp

        import hammer_jax
        from hammer_jax.generate import JaxStepper
        from hammer_jax.scorer import JaxScorer

        model = hammer_jax.from_pretrained(path, dtype=getattr(jnp, dtype))
        return JaxScorer(model), lambda max_len: JaxStepper(model, max_len)
    import torch

    import hammer_torch
    from hammer_torch.generate import TorchStepper
    from hammer_torch.scorer import TorchScorer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hammer_torch.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    return TorchScorer.from_twin(model), lambda max_len: TorchStepper(model, max_len)


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
