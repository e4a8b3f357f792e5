"""What a child process of the baseline (hf_baseline.py --child NAME) runs: the environment and bf16 matmul
probe, or one training variant at each micro-batch until one fits. Each ends with the RESULT_JSON line the
driver reads."""

import json
import os
import statistics
import subprocess
import sys
import time
import traceback

from hf_lengths import length_batches
from hf_variants import LORA_TARGETS, MODEL_A, MODEL_B, PEAK_DATASHEET, SEQ, TINY, VARIANTS


def emit(obj):
    """Print ``obj`` as the RESULT_JSON line the driver takes a child's result from."""
    print("RESULT_JSON " + json.dumps(obj), flush=True)


# ----------------------------------------------------------------------------------------
# Child: environment + matmul ceiling
# ----------------------------------------------------------------------------------------
def matmul_rate(torch, n=8192, iters=30, warmup=5, sets=3):
    """bf16 n^3 matmul on random normal data, events per product, median. Returns FLOP/s."""
    dev = "cuda"
    g = torch.Generator(device=dev)
    g.manual_seed(1234)
    As = [torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(sets)]
    Bs = [torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(sets)]
    C = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    # correctness spot check against fp32 on a slice
    torch.matmul(As[0], Bs[0], out=C)
    ref = As[0][:256].float() @ Bs[0].float()
    rel = ((C[:256].float() - ref).norm() / ref.norm()).item()
    for i in range(warmup):
        torch.matmul(As[i % sets], Bs[i % sets], out=C)
    torch.cuda.synchronize()
    res = []
    for rep in range(2):  # two timing batches, to show the spread
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for i in range(iters):
            ev[i][0].record()
            torch.matmul(As[i % sets], Bs[i % sets], out=C)
            ev[i][1].record()
        torch.cuda.synchronize()
        ts = [a.elapsed_time(b) / 1e3 for a, b in ev]
        res.append(2 * n**3 / statistics.median(ts))
    del As, Bs, C
    torch.cuda.empty_cache()
    return res, rel


def child_env(final=False):
    """The environment (versions, GPU, SDPA kernels; not when ``final``) and the bf16 matmul rate, emitted."""
    import torch

    out = {"name": "matmul_end" if final else "env_matmul"}
    if not final:
        import importlib

        info = {}
        info["python"] = sys.version.split()[0]
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        for mod in ["transformers", "peft", "accelerate", "triton"]:
            try:
                m = importlib.import_module(mod)
                info[mod] = getattr(m, "__version__", "?")
            except Exception as e:  # noqa: BLE001
                info[mod] = f"import failed: {type(e).__name__}: {e}"[:300]
        for mod in ["flash_attn", "liger_kernel"]:
            try:
                m = importlib.import_module(mod)
                info["import_" + mod] = "ok " + str(getattr(m, "__version__", ""))
            except Exception as e:  # noqa: BLE001
                info["import_" + mod] = f"FAILED: {type(e).__name__}: {e}"[:300]
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_mem_GiB"] = round(p.total_memory / 2**30, 2)
        info["sm_count"] = p.multi_processor_count
        info["capability"] = f"{p.major}.{p.minor}"
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except Exception as e:  # noqa: BLE001
            info["nvidia_smi"] = f"failed: {e}"
        info["sdp_flags"] = dict(
            flash=torch.backends.cuda.flash_sdp_enabled(),
            mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
            cudnn=torch.backends.cuda.cudnn_sdp_enabled(),
            math=torch.backends.cuda.math_sdp_enabled(),
        )
        info["PYTORCH_CUDA_ALLOC_CONF"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        # Which SDPA kernel runs for model A's attention shape (GQA 32q/4kv, causal, bf16)?
        try:
            import torch.nn.functional as F
            from torch.profiler import ProfilerActivity, profile

            q = torch.randn(1, 32, SEQ, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(1, 4, SEQ, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(1, 4, SEQ, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
                torch.cuda.synchronize()
            names = sorted(
                {
                    e.key
                    for e in prof.key_averages()
                    if any(
                        s in e.key.lower() for s in ("flash", "fmha", "attn", "attention", "cudnn", "sdpa", "efficient")
                    )
                }
            )
            info["sdpa_kernels_gqa_causal_bf16"] = [n[:120] for n in names][:8]
        except Exception as e:  # noqa: BLE001
            info["sdpa_kernels_gqa_causal_bf16"] = f"probe failed: {type(e).__name__}: {e}"[:300]
        out["env"] = info
        print(json.dumps(info, indent=1), flush=True)
    rates, rel = matmul_rate(torch, n=1024 if TINY else 8192)
    out["matmul_bf16_flops"] = rates
    out["matmul_rel_err_vs_fp32"] = rel
    print(
        f"matmul 8192^3 bf16: {[round(r / 1e12, 1) for r in rates]} TFLOP/s (two batches of 30, median each); "
        f"rel err vs fp32 {rel:.2e}",
        flush=True,
    )
    out["status"] = "ok"
    emit(out)


# ----------------------------------------------------------------------------------------
# Device shim: the real runs are CUDA-only; the CPU path exists only so that the code can be
# smoke-tested (ANCHOR_TINY=1) on a machine without a GPU.
# ----------------------------------------------------------------------------------------
class _CpuEvent:
    def __init__(self, **_):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def dev_tools(torch):
    """Synchronisation, timing events and memory counters of the device: CUDA, else no-op CPU stand-ins."""
    if torch.cuda.is_available():
        return dict(
            dev="cuda",
            sync=torch.cuda.synchronize,
            Event=torch.cuda.Event,
            max_alloc=torch.cuda.max_memory_allocated,
            max_reserved=torch.cuda.max_memory_reserved,
            alloc=torch.cuda.memory_allocated,
            reset_peak=torch.cuda.reset_peak_memory_stats,
            empty=torch.cuda.empty_cache,
        )
    zero = lambda: 0  # noqa: E731
    return dict(
        dev="cpu",
        sync=lambda: None,
        Event=_CpuEvent,
        max_alloc=zero,
        max_reserved=zero,
        alloc=zero,
        reset_peak=lambda: None,
        empty=lambda: None,
    )


# ----------------------------------------------------------------------------------------
# Child: one training variant
# ----------------------------------------------------------------------------------------
def child_train(name, mbs, steps, warmup):
    """Train variant ``name`` at each micro-batch of ``mbs`` in turn until one runs (not out of memory); emit
    every attempt and the one that ran as ``best``."""
    import gc

    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    D = dev_tools(torch)
    DEV = D["dev"]
    spec = VARIANTS[name]
    shape = MODEL_A if spec["model"] == "A" else MODEL_B
    result = dict(name=name, desc=spec["desc"], model=spec["model"], seq=SEQ, attempts=[])

    def build():
        cfg = LlamaConfig(**shape, attn_implementation="sdpa", use_cache=False, tie_word_embeddings=False)
        wdtype = torch.float32 if spec["weights"] == "fp32" else torch.bfloat16
        old = torch.get_default_dtype()
        torch.set_default_dtype(wdtype)
        try:
            with torch.device(DEV):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(old)
        if getattr(model.config, "_attn_implementation", None) != "sdpa":
            model.set_attn_implementation("sdpa")
        model.train()
        return model

    def flops_per_token(n_matmul, n_lora):
        L, h = shape["num_hidden_layers"], shape["hidden_size"]
        attn = 12 * L * h * SEQ  # QK^T and AV, fwd+bwd; causal counted as full
        if spec["kind"] == "full":
            return 6 * n_matmul + attn
        # LoRA: fwd 2N + bwd activation-grad 2N for frozen base; adapters 6 * N_lora
        return 4 * n_matmul + 6 * n_lora + attn

    def attempt(mb):
        D["empty"]()
        D["reset_peak"]()
        info = dict(mb=mb)
        t0 = time.perf_counter()
        model = build()
        info["attn_impl"] = getattr(model.config, "_attn_implementation", None)
        info["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
        n_total = sum(p.numel() for p in model.parameters())
        n_embed = model.get_input_embeddings().weight.numel()
        n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        info.update(
            n_params_total=n_total,
            n_embed=n_embed,
            n_linear_incl_lm_head=n_matmul,
            n_nonembed_incl_lm_head=n_total - n_embed,
        )
        if spec["gc"]:
            model.gradient_checkpointing_enable()
            if spec["kind"] == "lora":
                model.enable_input_require_grads()  # needed for reentrant checkpointing with frozen embeddings
            try:
                fn = model.model.layers[0]._gradient_checkpointing_func
                info["gc_func"] = (
                    f"{getattr(fn, 'func', fn).__module__}.{getattr(getattr(fn, 'func', fn), '__name__', '?')} kwargs={getattr(fn, 'keywords', {})}"
                )
            except Exception as e:  # noqa: BLE001
                info["gc_func"] = f"? ({e})"
        n_lora = 0
        if spec["kind"] == "lora":
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.0, bias="none", target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
            )
            model = get_peft_model(model, lcfg)
            params = [p for p in model.parameters() if p.requires_grad]
            n_lora = sum(p.numel() for p in params)
            info["trainable_dtypes"] = sorted({str(p.dtype) for p in params})
            lr = 1e-4
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            lr = 1e-5
        info["n_trainable"] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=lr, fused=True)
        fwd = model
        if spec["compile"]:
            fwd = torch.compile(model)
        info["build_s"] = round(time.perf_counter() - t0, 2)
        info["mem_after_build_GiB"] = round(D["alloc"]() / 2**30, 2)

        vocab = shape["vocab_size"]
        g = torch.Generator(device=DEV)
        g.manual_seed(mb)
        use_ac = spec["autocast"]
        data = spec.get("data", "fixed")
        if data == "fixed":
            pool = [torch.randint(0, vocab, (mb, SEQ), device=DEV, generator=g) for _ in range(4)]
            batches = [dict(input_ids=b, labels=b) for b in pool]
        else:  # padded to the longest sample of each batch, pads not attended to nor trained
            batches = []
            for lengths in length_batches(data, spec["order"], mb, warmup + steps, SEQ):
                ids = torch.randint(3, vocab, (mb, max(lengths)), device=DEV, generator=g)
                mask = torch.arange(max(lengths), device=DEV)[None, :] < torch.tensor(lengths, device=DEV)[:, None]
                ids = ids.masked_fill(~mask, 0)
                batches.append(dict(input_ids=ids, attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100)))
        trained = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]

        def step(i, check=False):
            batch = batches[i % len(batches)]
            with torch.autocast(DEV, dtype=torch.bfloat16, enabled=use_ac):
                out = fwd(**batch, use_cache=False)
            loss = out.loss
            loss.backward()
            if check:
                info["n_trainable_with_grad"] = sum(1 for p in params if p.grad is not None)
                info["n_trainable_tensors"] = len(params)
                info["logits_dtype"] = str(out.logits.dtype)
            del out
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        wtimes = []
        for i in range(warmup):
            ts = time.perf_counter()
            step(i, check=(i == 0))
            D["sync"]()
            wtimes.append(round(time.perf_counter() - ts, 3))
            print(f"  [{name} mb={mb}] warm-up step {i}: {wtimes[-1]} s", flush=True)
        info["warmup_step_s"] = wtimes
        if spec["compile"]:
            try:
                from torch._dynamo.utils import counters

                info["dynamo_graph_breaks"] = {k: v for k, v in list(counters["graph_break"].items())[:10]}
                info["dynamo_unique_graphs"] = counters["stats"].get("unique_graphs")
            except Exception as e:  # noqa: BLE001
                info["dynamo_graph_breaks"] = f"? ({e})"
        ev = [(D["Event"](enable_timing=True), D["Event"](enable_timing=True)) for _ in range(steps)]
        losses = []
        D["sync"]()
        tw = time.perf_counter()
        for i in range(steps):
            ev[i][0].record()
            losses.append(step(warmup + i))
            ev[i][1].record()
        D["sync"]()
        wall = time.perf_counter() - tw
        times = [a.elapsed_time(b) / 1e3 for a, b in ev]
        losses = [float(x) for x in losses]
        med = statistics.median(times)
        tokens = mb * SEQ
        fpt = flops_per_token(n_matmul, n_lora)
        if data != "fixed":  # trained tokens over the timed steps' time: batches differ in length
            tokens = sum(trained[warmup:]) / steps * med / (sum(times) / steps)
            info["trained_tokens_per_s"] = sum(trained[warmup:]) / sum(times)
        info.update(
            status="ok",
            step_s=[round(t, 5) for t in times],
            step_median_s=med,
            step_min_s=min(times),
            step_max_s=max(times),
            wall_s=wall,
            tokens_per_s=tokens / med,
            tokens_per_s_wall=tokens * steps / wall,
            flops_per_token=fpt,
            n_lora=n_lora,
            achieved_flops=fpt * tokens / med,
            mfu_989=fpt * tokens / med / PEAK_DATASHEET,
            peak_alloc_GiB=D["max_alloc"]() / 2**30,
            peak_reserved_GiB=D["max_reserved"]() / 2**30,
            loss_first=losses[0],
            loss_last=losses[-1],
            losses_finite=all(x == x and abs(x) != float("inf") for x in losses),
        )
        print(
            f"  [{name} mb={mb}] median step {med * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}), "
            f"{tokens / med:,.0f} tok/s, MFU(989) {info['mfu_989'] * 100:.1f}%, peak {info['peak_alloc_GiB']:.2f} GiB, "
            f"loss {losses[0]:.3f}->{losses[-1]:.3f}",
            flush=True,
        )
        return info

    result["transformers"] = transformers.__version__
    if mbs is None:
        mbs = [8, 4, 2, 1]
    for mb in mbs:
        ok = False
        try:
            info = attempt(mb)
            ok = True
        except torch.OutOfMemoryError as e:
            info = dict(
                mb=mb,
                status="OOM",
                error=str(e).split("\n")[0][:300],
                peak_alloc_GiB_before_oom=D["max_alloc"]() / 2**30,
            )
            print(f"  [{name} mb={mb}] OOM: {info['error'][:160]}", flush=True)
        except Exception as e:  # noqa: BLE001
            info = dict(
                mb=mb, status="error", error=f"{type(e).__name__}: {e}"[:600], traceback=traceback.format_exc()[-3000:]
            )
            print(f"  [{name} mb={mb}] ERROR:\n{info['traceback']}", flush=True)
        result["attempts"].append(info)
        # Drop everything the failed/finished attempt held before the next one.
        gc.collect()
        if spec["compile"]:
            try:
                torch._dynamo.reset()
            except Exception:  # noqa: BLE001
                pass
        gc.collect()
        D["empty"]()
        if ok:
            result["best"] = info
            break
        if info["status"] == "error":
            break
    result["status"] = "ok" if "best" in result else "failed"
    emit(result)
