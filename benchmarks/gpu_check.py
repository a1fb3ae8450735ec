"""GPU checks (no pytest, no network needed): run `bash benchmarks/gpu_check.sh`.

1. The chunked kernel equals the dense reference on CUDA in float64 (outputs and gradients,
   including the span parameter), and the model in float32 on CUDA equals float64 on the CPU.
2. A bf16-autocast training step of `enwik8_small` (18 layers, d 512, N 1024, S 8192, M 512):
   tokens/s and model FLOP utilisation against the GPU's bf16 dense peak.
3. Incremental decoding on CUDA equals one forward pass (float64), and generated tokens/s of an
   18-layer d 512 N 1024 S 1024 model (float32, batch 1).
4. The FlexAttention formulation (`--runtime.attn_impl flex`, compiled) against the float64
   reference without the + eps (outputs and every gradient, spans without keys at mask 0), and
   one attention layer's forward + backward in bf16 at enwik8_small's shape (S 8192) with the
   chunked, dense and flex kernels, side by side; then enwik8_small bf16 steps with dropout 0
   (flex has none) with the chunked and the flex kernel.
Prints one JSON line per result; exits non-zero if a check fails.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

from allattn import bench
from allattn.attention import attend
from allattn.config import ModelConfig, load_preset
from allattn.data import char_corpus
from allattn.model import AllAttentionLM
from allattn.train import Trainer, adopt_vocabulary

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU


def kernel_equality() -> float:
    g = torch.Generator(device="cuda").manual_seed(0)
    dt, dev = torch.float64, "cuda"

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=dt, device=dev).requires_grad_()

    batch, heads, block, context, dim, n_mem = 2, 4, 300, 700, 32, 64
    q, k, v = (
        leaf(batch, heads, block, dim),
        leaf(batch, heads, context + block, dim),
        leaf(batch, heads, context + block, dim),
    )
    pos, mk, mv = leaf(context, dim), leaf(heads, n_mem, dim), leaf(heads, n_mem, dim)
    z = torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=dt, device=dev, requires_grad=True)
    upstream = torch.randn(batch, heads, block, dim, generator=g, dtype=dt, device=dev)
    results = []
    for impl in ("reference", "chunked"):
        for t in (q, k, v, pos, mk, mv, z):
            t.grad = None
        mask = ((z[:, None] * context - torch.arange(context, device=dev)) / 32 + 1).clamp(0, 1)
        out = attend(q, k, v, pos, span_mask=mask, mem_key=mk, mem_val=mv, impl=impl)
        (out * upstream).sum().backward()
        results.append([out.detach()] + [t.grad.clone() for t in (q, k, v, pos, mk, mv, z)])
    return max((a - b).abs().max().item() for a, b in zip(*results, strict=True))


def bf16_kernel_error() -> dict:
    """The chunked kernel under bf16 autocast on CUDA against float64: relative errors of the
    output and the gradients (the CPU test's tolerance is 1.5e-2, z's 1e-1)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    shapes = {"q": (2, 4, 256, 64), "k": (2, 4, 768, 64), "v": (2, 4, 768, 64),
              "pos": (512, 64), "mk": (4, 64, 64), "mv": (4, 64, 64)}  # fmt: skip
    exact = {
        n: torch.randn(*s, generator=g, device="cuda", dtype=torch.float64)
        for n, s in shapes.items()
    }
    exact["z"] = torch.tensor([0.1, 0.4, 0.7, 1.0], device="cuda", dtype=torch.float64)
    upstream = torch.randn(2, 4, 256, 64, generator=g, device="cuda", dtype=torch.float64)
    results = []
    for low in (False, True):
        leaves = {n: (t.float() if low else t).clone().requires_grad_() for n, t in exact.items()}
        z = leaves["z"]
        mask = ((z[:, None] * 512 - torch.arange(512, device="cuda")) / 32 + 1).clamp(0, 1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=low):
            q, k, v = (leaves[n].to(torch.bfloat16) if low else leaves[n] for n in "qkv")
            out = attend(q, k, v, leaves["pos"], span_mask=mask, mem_key=leaves["mk"],
                         mem_val=leaves["mv"], impl="chunked")  # fmt: skip
        (out.double() * upstream).sum().backward()
        results.append((out.detach().double(), {n: t.grad.double() for n, t in leaves.items()}))
    (ref, ref_grads), (low_out, low_grads) = results

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()

    errors = {n: rel(low_grads[n], ref_grads[n]) for n in ref_grads}
    return {
        "output": rel(low_out, ref),
        "gradients": errors,
        "worst_gradient_but_z": max(e for n, e in errors.items() if n != "z"),
    }


def flex_error() -> dict:
    """flex (float32 and bf16, compiled) against the float64 reference with renorm_eps 0:
    relative errors of the output and of every gradient. z * S is not an integer for any head,
    so no key has a span mask of exactly 0 (where flex gives z no gradient, DESIGN §2.4)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    context, block = 700, 300
    shapes = {"q": (2, 4, block, 32), "k": (2, 4, context + block, 32),
              "v": (2, 4, context + block, 32), "pos": (context, 32), "mk": (4, 64, 32),
              "mv": (4, 64, 32)}  # fmt: skip
    exact = {
        n: torch.randn(*s, generator=g, device="cuda", dtype=torch.float64)
        for n, s in shapes.items()
    }
    exact["z"] = torch.tensor([0.1234, 0.3456, 0.5678, 0.9012], device="cuda").double()
    upstream = torch.randn(2, 4, block, 32, generator=g, device="cuda", dtype=torch.float64)

    def run(impl: str, dtype: torch.dtype, low: bool):
        leaves = {n: t.to(dtype).clone().requires_grad_() for n, t in exact.items()}
        z = leaves["z"]
        distance = torch.arange(context, device="cuda")
        mask = ((z[:, None] * context - distance) / 32 + 1).clamp(0, 1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=low):
            q, k, v = (leaves[n].to(torch.bfloat16) if low else leaves[n] for n in "qkv")
            out = attend(q, k, v, leaves["pos"], span_mask=mask, mem_key=leaves["mk"],
                         mem_val=leaves["mv"], renorm_eps=0.0, impl=impl)  # fmt: skip
        (out.double() * upstream).sum().backward()
        return out.detach().double(), {n: t.grad.double() for n, t in leaves.items()}

    ref, ref_grads = run("reference", torch.float64, False)
    result = {}
    for name, dtype, low in (("float32", torch.float32, False), ("bf16", torch.float32, True)):
        out, grads = run("flex", dtype, low)
        errors = {n: ((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in grads}
        result[name] = {"output": ((out - ref).norm() / ref.norm()).item(), "gradients": errors}
    return result


def layer_speeds(batch: int = 8, steps: int = 10) -> dict:
    """One attention layer's forward + backward (ms) at enwik8_small's shape in bf16 (H 8, D 64,
    N 1024, S 8192, M 512, full spans), chunked, reference and flex side by side."""
    heads, dim, n_mem, context, block = 8, 64, 1024, 8192, 512
    bf = torch.bfloat16

    def leaf(*shape, dtype=bf):
        return torch.randn(*shape, device="cuda", dtype=dtype).requires_grad_()

    q, k, v = (
        leaf(batch, heads, block, dim),
        leaf(batch, heads, context + block, dim),
        leaf(batch, heads, context + block, dim),
    )
    pos, mk, mv = (leaf(context, dim, dtype=torch.float32), leaf(heads, n_mem, dim,
                   dtype=torch.float32), leaf(heads, n_mem, dim, dtype=torch.float32))  # fmt: skip
    z = torch.full((heads,), 1.0, device="cuda", requires_grad=True)
    results = {}
    for impl in ("chunked", "reference", "flex"):
        torch.cuda.reset_peak_memory_stats()
        try:
            times = []
            for step in range(steps + 2):  # two untimed: compilation, allocator warm-up
                torch.cuda.synchronize()
                start = time.perf_counter()
                mask = (z[:, None] * context - torch.arange(context, device="cuda")) / 32 + 1
                with torch.autocast("cuda", dtype=bf):
                    out = attend(q, k, v, pos, span_mask=mask.clamp(0, 1), mem_key=mk,
                                 mem_val=mv, impl=impl)  # fmt: skip
                out.float().sum().backward()
                torch.cuda.synchronize()
                if step >= 2:
                    times.append(time.perf_counter() - start)
            results[impl] = {
                "ms": 1e3 * sorted(times)[len(times) // 2],
                "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
            }
        except Exception as error:  # out of memory (dense at S 8192) or a compile failure
            results[impl] = {"failed": f"{type(error).__name__}: {str(error)[:200]}"}
            torch.cuda.empty_cache()
    fastest = min((r["ms"], n) for n, r in results.items() if "ms" in r)
    return {"check": "attention layer fwd+bwd, bf16, enwik8_small shape", "batch": batch,
            "kernels": results, "fastest": fastest[1]}  # fmt: skip


def train_step(batch_size: int, steps: int = 5, device: str = "cuda", **overrides) -> dict:
    config = load_preset("enwik8_small").override(
        {
            "train.batch_size": str(batch_size),
            "train.batch_split": "1",
            "runtime.precision": "bf16",
            "runtime.device": device,
            "model.span_init": "1.0",  # full spans: the most expensive case
            **overrides,
        }
    )
    text = "".join(chr(32 + (i * 7919) % 90) for i in range(60_000))
    need = 3 * batch_size * config.train.block_size
    corpus = char_corpus(text * math.ceil(need / len(text) / 0.9 + 1), (0.9, 0.05, 0.05))
    config = adopt_vocabulary(config, corpus.vocab)
    trainer = Trainer(config, corpus, run_dir=None)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    trainer.train_step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    m = config.model
    tokens = batch_size * config.train.block_size
    per_layer = bench.layer_flops(
        batch_size,
        config.train.block_size,
        trainer.model.layers[0].context_length(),
        m.n_heads,
        m.head_dim,
        m.n_persistent,
    )
    flops = m.n_layers * per_layer + 6 * tokens * m.d_model * m.vocab_size
    name = torch.cuda.get_device_name() if device == "cuda" else device
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    return {
        "check": f"enwik8_small {config.runtime.precision} train step"
        + (" (compiled)" if config.runtime.compile else "")
        + f", {config.runtime.attn_impl} kernel, dropout {config.model.dropout}",
        "device": name,
        "batch_size": batch_size,
        "tokens_per_s": tokens / seconds,
        "ms_per_step": seconds * 1e3,
        "model_tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / 1e12 / peak if peak else None,
        "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def decoding() -> dict:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=50, d_model=64, n_heads=4, n_layers=3, n_persistent=16, attn_span=192
    )
    model = AllAttentionLM(config).double().cuda().eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.span.z.uniform_(0.0, 0.3)  # partly trimmed spans
    seq = torch.randint(50, (2, 450), device="cuda")
    with torch.no_grad():
        full = model(seq).logprobs
    kv = model.init_kv_cache(2)
    pieces = [model.forward_kv(seq[:, :100], kv)]
    pieces += [model.forward_kv(seq[:, t : t + 1], kv) for t in range(100, 450)]
    diff = (torch.cat(pieces, 1) - full).abs().max().item()

    speed = bench.generate_case(
        load_preset("enwik8_small")
        .override({"model.attn_span": "1024", "model.span_init": "1.0"})
        .to_dict(),
        128,
        4,
        device="cuda",
    )
    return {
        "check": "incremental decoding == one forward pass, float64, CUDA",
        "max_abs_diff": diff,
        "generate_18_layers_S1024": speed,
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    worst = kernel_equality()
    print(json.dumps({"check": "chunked == reference, float64, CUDA", "max_abs_diff": worst}))
    ok = worst <= 1e-9
    result = decoding()
    print(json.dumps(result))
    ok = ok and result["max_abs_diff"] <= 1e-9
    flex = flex_error()
    print(json.dumps({"check": "flex against float64 (renorm_eps 0), CUDA", **flex}))
    worst_flex = max(flex["float32"]["output"], *flex["float32"]["gradients"].values())
    ok = ok and worst_flex <= 1e-4
    print(json.dumps(layer_speeds()))
    bf16 = bf16_kernel_error()
    print(json.dumps({"check": "chunked bf16 autocast against float64, CUDA", **bf16}))
    ok = ok and bf16["output"] <= 1.5e-2 and bf16["worst_gradient_but_z"] <= 1.5e-2
    for batch_size in (8, 16):
        try:
            print(json.dumps(train_step(batch_size)))
        except torch.OutOfMemoryError:
            print(json.dumps({"check": "train step", "batch_size": batch_size, "oom": True}))
            torch.cuda.empty_cache()
            break
    # fp16 with loss scaling, bf16 under --runtime.compile (triton), and dropout 0 with the
    # chunked and the flex kernel, at batch 8
    no_dropout = {"model.dropout": "0"}
    for overrides in (
        {"runtime.precision": "fp16"},
        {"runtime.compile": "true"},
        no_dropout,
        {**no_dropout, "runtime.attn_impl": "flex"},
    ):
        try:
            print(json.dumps(train_step(8, **overrides)))
        except Exception as error:  # report and go on: the other checks still count
            print(json.dumps({"check": f"train step {overrides}", "failed": str(error)[:300]}))
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
