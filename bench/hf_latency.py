#!/usr/bin/env python3
"""HuggingFace's PyTorch Mamba path, timed as icd's MeasureLatency times
icd's: prefill of [batch, seq_len] tokens, and single-token decoding with the
recurrent cache after a prompt of seq_len tokens, through generate(). CUDA events around each
sample, warm-up first, median and p10/p90 over the samples.

  hf_latency.py --model DIR [--dtype bfloat16] [--batch 1] [--seq-len 2048]
                [--iters 5] [--warmup 1] [--decode-steps 32]

Prints one JSON line per mode, with the path HF took: without mamba_ssm and
causal_conv1d installed, MambaMixer runs its slow path, a Python loop over
time. Greedy decoding is checked against the full forward's argmax.
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
    # A Mamba decode step costs the same after any prompt (the state has a
    # fixed size), and HF's slow path takes seconds to prefill 2048 tokens.
    parser.add_argument("--decode-prompt-len", type=int, default=64)
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

        # Decode through generate(), HF's own cache handling: the time of
        # generating 1 + decode_steps tokens greedily after the prompt, less
        # the time of generating 1 (the prefill and its first token), per
        # step. Per-sample: one pair of runs.
        gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)
        prompt = prompt[:, :args.decode_prompt_len]
        attention = torch.ones_like(prompt)

        def generate(new_tokens):
            return model.generate(prompt, attention_mask=attention, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, **gen)

        times = []
        for i in range(args.warmup + args.iters):
            one_ms, _ = timed(lambda: generate(1))
            many_ms, generated = timed(lambda: generate(1 + args.decode_steps))
            if i >= args.warmup:
                times.append((many_ms - one_ms) / args.decode_steps)
        # Greedy tokens must be the full forward's argmax at every position.
        full = model(generated, use_cache=False).logits[:, prompt.size(1) - 1:-1]
        top1 = (full.argmax(-1) == generated[:, prompt.size(1):]).float().mean().item()
        summary("decode", times, dict(common, decode_steps=args.decode_steps,
                                      prompt_len=prompt.size(1),
                                      method_detail="(generate(1+k) - generate(1)) / k",
                                      decode_vs_forward_top1=top1))


if __name__ == "__main__":
    main()
