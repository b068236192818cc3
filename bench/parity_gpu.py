"""Numerics of every attention kernel and compile path on one GPU, in one run.

Same random weights (HF names, through convert's table) in the twin and the JAX model; each row
compares one path against its reference on the same batch: max-abs and relative (norm of the
difference over the reference's norm) logit differences, with a tolerance. Rows that need CUDA,
flash-attn or a JAX GPU backend print why they are skipped, so the script also runs on a CPU
(where it checks the float32 rows only).

    python bench/parity_gpu.py [--config configs/tiny.json] [--batch 4] [--seq 512]

Writes bench/results/parity_gpu.json (or --out) and exits 1 if any row exceeds its tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# JAX would otherwise take 75% of the GPU that torch shares with it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import convert  # noqa: E402
from hammer.config import ModelConfig  # noqa: E402
from hammer.fsio import atomic_file  # noqa: E402
from hammer_torch.checkpoint import from_tensors  # noqa: E402
from hammer_torch.loss import causal_lm_loss  # noqa: E402

# Relative-difference tolerances: float32 paths agree to rounding; bfloat16 to its 8-bit mantissa.
TOL_F32, TOL_BF16 = 1e-5, 3e-2


def random_tensors(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Unit-scale activations at any size (std 1/sqrt(fan_in)), so that differences mean something;
    HF's 0.02 init leaves the logits near zero."""
    rng = np.random.default_rng(seed)

    def sample(t):
        if t.hf.endswith("norm.weight"):
            return 1 + 0.2 * rng.standard_normal(t.hf_shape)
        std = 1.0 if t.hf == "model.embed_tokens.weight" else t.hf_shape[1] ** -0.5
        return std * rng.standard_normal(t.hf_shape)

    return {t.hf: sample(t).astype(np.float32) for t in convert.tensors(config)}


def diff(got, ref) -> dict[str, float]:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return {"max_abs": float(np.abs(got - ref).max()),
            "rel": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}


class Report:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, check: str, tol: float, compute) -> None:
        start = time.perf_counter()
        try:
            result = compute()
        except Skip as e:
            self.skip(check, str(e))
            return
        except Exception as e:  # one broken kernel must not hide the other rows
            self.rows.append({"check": check, "status": f"FAIL: {type(e).__name__}: {e}"})
            print(f"{check:<52} FAIL: {type(e).__name__}: {e}", flush=True)
            return
        row = {"check": check, **result, "tol_rel": tol, "seconds": round(time.perf_counter() - start, 2)}
        row["status"] = "ok" if result["rel"] <= tol else "FAIL"
        self.rows.append(row)
        print(f"{check:<52} max_abs {row['max_abs']:.3e}  rel {row['rel']:.3e}  "
              f"(tol {tol:.0e}) {row['status']}", flush=True)

    def skip(self, check: str, reason: str) -> None:
        self.rows.append({"check": check, "status": f"skipped: {reason}"})
        print(f"{check:<52} skipped: {reason}", flush=True)


class Skip(Exception):
    pass


def twin_logits(config, tensors, ids, *, device, dtype, attn_impl, compile=False) -> np.ndarray:
    model = from_tensors(config, tensors, dtype=dtype, attn_impl=attn_impl).to(device)
    if compile:
        model.compile_blocks()
    with torch.no_grad():
        return model(torch.from_numpy(ids).to(device)).float().cpu().numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.json")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "parity_gpu.json")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        print("no CUDA device: running the float32 rows on CPU, skipping the GPU-only rows", flush=True)
    config = ModelConfig.from_hf(args.config)
    tensors = random_tensors(config, args.seed)
    ids = np.random.default_rng(args.seed + 1).integers(0, config.vocab_size, (args.batch, args.seq))
    bf16 = torch.bfloat16
    print(f"config {args.config.name}, batch {args.batch} x {args.seq}, device {device}", flush=True)

    reference = twin_logits(config, tensors, ids, device=device, dtype=torch.float32, attn_impl="eager")
    report = Report()

    def need_cuda():
        if not cuda:
            raise Skip("needs a CUDA GPU")

    def twin_bf16():
        need_cuda()
        return twin_logits(config, tensors, ids, device=device, dtype=bf16, attn_impl="sdpa")

    def sdpa_flash_bf16():
        return diff(twin_bf16(), reference)

    def need_flash_attn():
        need_cuda()
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise Skip("flash-attn is not installed") from None

    def flash_attn_bf16():
        need_flash_attn()
        return diff(twin_logits(config, tensors, ids, device=device, dtype=bf16, attn_impl="flash_attn"),
                    reference)

    def flash_attn_vs_sdpa_bf16():
        need_flash_attn()
        kw = dict(device=device, dtype=bf16)
        return diff(twin_logits(config, tensors, ids, attn_impl="flash_attn", **kw),
                    twin_logits(config, tensors, ids, attn_impl="sdpa", **kw))

    def sdpa_f32_cpu():
        return diff(twin_logits(config, tensors, ids, device="cpu", dtype=torch.float32, attn_impl="sdpa"),
                    reference)

    def compiled(dtype, impl):
        def run():
            kw = dict(device=device, dtype=dtype, attn_impl=impl)
            return diff(twin_logits(config, tensors, ids, compile=True, **kw),
                        twin_logits(config, tensors, ids, **kw))
        return run

    def cached_decode(impl):
        """Prefill, then several tokens at once (the bottom-right causal mask against a cache),
        then single steps, against one full forward; bfloat16 on CUDA."""
        def run():
            if impl == "flash_attn":
                need_flash_attn()
            dtype = bf16 if cuda else torch.float32
            model = from_tensors(config, tensors, dtype=dtype, attn_impl=impl).to(device)
            x = torch.from_numpy(ids).to(device)
            a, b, end = x.shape[1] // 2, x.shape[1] // 2 + 7, min(x.shape[1], x.shape[1] // 2 + 15)
            cache = model.init_cache(x.shape[0], end)
            with torch.no_grad():
                full = model(x[:, :end])
                pieces = [model.decode(x[:, :a], cache), model.decode(x[:, a:b], cache)]
                pieces += [model.decode(x[:, i:i + 1], cache) for i in range(b, end)]
            return diff(torch.cat(pieces, 1).float().cpu().numpy(), full.float().cpu().numpy())
        return run

    def chunked_loss():
        model = from_tensors(config, tensors, dtype=torch.float32, attn_impl="eager").to(device)
        x = torch.from_numpy(ids).to(device)
        with torch.no_grad():
            logits = model(x)
            plain = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
            chunked = causal_lm_loss(model, x, chunk_size=1024)
        return diff([chunked.item()], [plain.item()])

    report.add("twin sdpa (flash backend) bf16 vs eager f32", TOL_BF16, sdpa_flash_bf16)
    report.add("twin flash_attn bf16 vs eager f32", TOL_BF16, flash_attn_bf16)
    report.add("twin flash_attn bf16 vs sdpa-flash bf16", TOL_BF16, flash_attn_vs_sdpa_bf16)
    report.add("twin sdpa f32 (CPU) vs eager f32", TOL_F32, sdpa_f32_cpu)
    if cuda:
        report.add("twin compiled sdpa bf16 vs not compiled", TOL_BF16, compiled(bf16, "sdpa"))
        report.add("twin compiled eager f32 vs not compiled", 1e-4, compiled(torch.float32, "eager"))
    else:
        report.add("twin compiled sdpa f32 vs not compiled", TOL_F32, compiled(torch.float32, "sdpa"))
    report.add(f"twin sdpa cached decode vs full forward {'bf16' if cuda else 'f32'}",
               TOL_BF16 if cuda else TOL_F32, cached_decode("sdpa"))
    report.add("twin flash_attn cached decode vs full forward bf16", TOL_BF16, cached_decode("flash_attn"))
    report.add("twin chunked loss vs plain loss f32", 1e-6, chunked_loss)
    jax_rows(report, config, tensors, ids, reference, twin_bf16)
    memory = loss_memory() if cuda else None
    if memory is None:
        print("loss peak memory at HammerLLM's 8 x 2048 x 105789: skipped: needs a CUDA GPU")

    results = {"config": str(args.config), "batch": args.batch, "seq": args.seq, "device": str(device),
               "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
               "python": platform.python_version(), "rows": report.rows, "loss_memory": memory}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out) as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 1 if any(r["status"].startswith("FAIL") for r in report.rows) else 0


def loss_memory(batch: int = 8, seq: int = 2048, hidden: int = 2048, vocab: int = 105789) -> dict:
    """Peak CUDA memory of forward + backward of the loss alone at HammerLLM's batch, bf16 head."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    features = torch.randn(batch, seq, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = 0.02 * torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    targets = torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)

    def plain(f, w):
        logits = torch.nn.functional.linear(f, w).float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def chunked(f, w):
        from hammer_torch.loss import chunked_cross_entropy

        return chunked_cross_entropy(f, w, targets)

    out = {}
    for name, fn in (("plain", plain), ("chunked", chunked)):
        f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(f, w).backward()
        torch.cuda.synchronize()
        out[f"{name}_peak_gb"] = round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)
        del f, w
        torch.cuda.empty_cache()
    print(f"loss peak memory at {batch} x {seq} x {vocab} (bf16 head, fwd+bwd): "
          f"plain {out['plain_peak_gb']} GB, chunked {out['chunked_peak_gb']} GB", flush=True)
    return out


def jax_rows(report: Report, config: ModelConfig, tensors, ids, reference, twin_bf16) -> None:
    try:
        import jax
        import jax.numpy as jnp

        from hammer_jax import model_from_params
    except ImportError as e:
        for check in ("jax xla f32 vs twin eager f32", "jax cudnn bf16 vs xla bf16",
                      "jax cudnn bf16 vs twin sdpa-flash bf16"):
            report.skip(check, f"JAX is not importable: {e}")
        return
    params = convert.hf_to_jax(tensors, config)

    def logits(dtype, impl):
        model = model_from_params(config, params, dtype=dtype, param_dtype=jnp.float32, attention_impl=impl)
        return np.asarray(jax.jit(lambda m, x: m(x).astype(jnp.float32))(model, jnp.asarray(ids)))

    def xla_f32():
        # Full float32 matmuls: on GPUs XLA's default precision may use TF32.
        with jax.default_matmul_precision("highest"):
            return diff(logits(jnp.float32, "xla"), reference)

    def cudnn_vs_xla():
        if jax.default_backend() != "gpu":
            raise Skip(f"needs a JAX GPU backend, JAX runs on {jax.default_backend()}")
        return diff(logits(jnp.bfloat16, "cudnn"), logits(jnp.bfloat16, "xla"))

    def cudnn_vs_twin():
        if jax.default_backend() != "gpu":
            raise Skip(f"needs a JAX GPU backend, JAX runs on {jax.default_backend()}")
        return diff(logits(jnp.bfloat16, "cudnn"), twin_bf16())

    report.add("jax xla f32 vs twin eager f32", 1e-4, xla_f32)
    report.add("jax cudnn bf16 vs xla bf16", TOL_BF16, cudnn_vs_xla)
    report.add("jax cudnn bf16 vs twin sdpa-flash bf16", TOL_BF16, cudnn_vs_twin)


if __name__ == "__main__":
    sys.exit(main())
