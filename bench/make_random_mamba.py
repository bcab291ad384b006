#!/usr/bin/env python3
"""Writes a randomly initialised HuggingFace Mamba checkpoint of a published
shape (the GPU benchmarks' models: the hub is not reachable there).

  make_random_mamba.py [--family mamba1|mamba2] --shape SHAPE --out DIR
                       [--dtype bfloat16] [--seed 0]

mamba1 (the default; MambaForCausalLM): mamba-130m's and mamba-2.8b's shapes
(state-spaces): d_model 768 / 2560, 24 / 64 layers, expand 2, d_state 16,
d_conv 4, vocabulary 50280, tied head.
mamba2 (Mamba2ForCausalLM): mamba2-130m's and mamba2-2.7b's shapes: d_model
768 / 2560, 24 / 64 layers, expand 2, d_state 128, head_dim 64 (24 / 80 heads),
one group, d_conv 4, chunk 256, gated RMSNorm, no dt clamp, vocabulary 50280,
tied head.
HuggingFace's own initialisation, on the GPU when there is one.
"""
import argparse
import json
import time

import torch
from transformers import MambaConfig, MambaForCausalLM

SHAPES = {
    "130m": dict(hidden_size=768, num_hidden_layers=24),
    "2.8b": dict(hidden_size=2560, num_hidden_layers=64),
}
MAMBA2_SHAPES = {
    "130m": dict(hidden_size=768, num_hidden_layers=24),
    "2.7b": dict(hidden_size=2560, num_hidden_layers=64),
}


def mamba2_config(shape):
    """Mamba2Config's names (transformers' configuration_mamba2.py). num_heads is
    explicit: HF checks hidden_size * expand == num_heads * head_dim. Imported
    here so that the mamba1 path runs exactly as before."""
    from transformers import Mamba2Config
    expand, head_dim = 2, 64
    heads = expand * shape["hidden_size"] // head_dim
    return Mamba2Config(vocab_size=50280, state_size=128, head_dim=head_dim, num_heads=heads, n_groups=1,
                        expand=expand, conv_kernel=4, use_bias=False, use_conv_bias=True,
                        tie_word_embeddings=True, rms_norm=True, chunk_size=256,
                        time_step_limit=(0.0, float("inf")), **shape)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=["mamba1", "mamba2"], default="mamba1")
    parser.add_argument("--shape", choices=sorted(set(SHAPES) | set(MAMBA2_SHAPES)), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shapes = SHAPES if args.family == "mamba1" else MAMBA2_SHAPES
    if args.shape not in shapes:
        parser.error(f"--shape {args.shape} is not a {args.family} shape ({', '.join(sorted(shapes))})")
    start = time.perf_counter()
    if args.family == "mamba1":
        config = MambaConfig(vocab_size=50280, state_size=16, expand=2, conv_kernel=4,
                             use_bias=False, use_conv_bias=True, tie_word_embeddings=True,
                             **SHAPES[args.shape])
        model_class = MambaForCausalLM
    else:
        from transformers import Mamba2ForCausalLM
        config, model_class = mamba2_config(MAMBA2_SHAPES[args.shape]), Mamba2ForCausalLM
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = model_class(config)
    model = model.to(getattr(torch, args.dtype))
    model.save_pretrained(args.out, safe_serialization=True)
    record = {"shape": args.shape, "out": args.out, "dtype": args.dtype,
              "parameters": sum(p.numel() for p in model.parameters()),
              "seconds": round(time.perf_counter() - start, 1)}
    if args.family != "mamba1":  # mamba1's line stays as it was
        record["family"] = args.family
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
