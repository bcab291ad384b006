#!/usr/bin/env python3
"""HuggingFace's PyTorch Mamba path, timed as icd's MeasureLatency times
icd's: prefill of [batch, seq_len] tokens, and single-token decoding with the
recurrent cache after a prefill of seq_len tokens. CUDA events around each
sample, warm-up first, median and p10/p90 over the samples.

  hf_latency.py --model DIR [--dtype bfloat16] [--batch 1] [--seq-len 2048]
                [--iters 5] [--warmup 1] [--decode-steps 32]

Prints one JSON line per mode, with the path HF took: without mamba_ssm and
causal_conv1d installed, MambaMixer runs its slow path, a Python loop over
time. The decode step is checked against the full forward's logits.
"""
import argparse
import inspect
import json
import statistics

import torch
import transformers
from transformers import MambaForCausalLM


def percentile(values, q):
    values = sorted(values)
    rank = q * (len(values) - 1)
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (rank - low) * (values[high] - values[low])


def summary(mode, times, extra):
    line = {"bench": "hf_latency", "mode": mode, "samples": len(times),
            "median_ms": statistics.median(times), "p10_ms": percentile(times, 0.1),
            "p90_ms": percentile(times, 0.9), "method": "cuda_events"}
    line.update(extra)
    print(json.dumps(line), flush=True)


def timed(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--skip-prefill", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    try:
        model = MambaForCausalLM.from_pretrained(args.model, dtype=dtype)
    except TypeError:
        model = MambaForCausalLM.from_pretrained(args.model, torch_dtype=dtype)
    model = model.cuda().eval()
    mixer_module = inspect.getmodule(type(model.backbone.layers[0].mixer))
    fast = bool(getattr(mixer_module, "is_fast_path_available", False))
    common = {"model": args.model, "dtype": args.dtype, "batch": args.batch,
              "seq_len": args.seq_len, "transformers": transformers.__version__,
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
              "hf_path": "cuda kernels (mamba_ssm)" if fast else "slow path (PyTorch loop)"}
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len + args.decode_steps),
                        generator=generator).cuda()
    prompt = ids[:, :args.seq_len]
    with torch.no_grad():
        if not args.skip_prefill:
            times = []
            for i in range(args.warmup + args.iters):
                ms, _ = timed(lambda: model(prompt, use_cache=False))
                if i >= args.warmup:
                    times.append(ms)
            summary("prefill", times, common)

        # Decode: the cache after a prefill of seq_len tokens, then one token
        # per sample, for every sample of the batch at once.
        params = inspect.signature(model.forward).parameters
        cache_name = "cache_params" if "cache_params" in params else "past_key_values"
        out = model(prompt, use_cache=True)
        cache = getattr(out, cache_name, None)
        if cache is None:
            raise SystemExit(f"no {cache_name} in the prefill's output")
        times, step_logits = [], []
        for step in range(args.warmup + args.decode_steps):
            position = args.seq_len + step
            kwargs = {cache_name: cache, "use_cache": True}
            if "cache_position" in params:
                kwargs["cache_position"] = torch.tensor([position], device="cuda")
            token = ids[:, position:position + 1]
            ms, out = timed(lambda: model(token, **kwargs))
            if getattr(out, cache_name, None) is not None:
                cache = getattr(out, cache_name)
            step_logits.append(out.logits[:, -1].float())
            if step >= args.warmup:
                times.append(ms)
        # The steps must agree with one forward over the same tokens.
        full = model(ids[:, :args.seq_len + args.warmup + args.decode_steps], use_cache=False)
        reference = full.logits[:, args.seq_len:].float()
        stepped = torch.stack(step_logits, 1)
        rel = ((stepped - reference).norm() / reference.norm()).item()
        top1 = (stepped.argmax(-1) == reference.argmax(-1)).float().mean().item()
        summary("decode", times, dict(common, decode_vs_forward_rel_l2=rel, decode_vs_forward_top1=top1))


if __name__ == "__main__":
    main()
