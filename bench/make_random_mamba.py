#!/usr/bin/env python3
"""Writes a randomly initialised HuggingFace Mamba checkpoint of a published
shape (the GPU benchmarks' models: the hub is not reachable there).

  make_random_mamba.py --shape 130m|2.8b --out DIR [--dtype bfloat16] [--seed 0]

Shapes are mamba-130m's and mamba-2.8b's (state-spaces): d_model 768 / 2560,
24 / 64 layers, expand 2, d_state 16, d_conv 4, vocabulary 50280, tied head.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    config = MambaConfig(vocab_size=50280, state_size=16, expand=2, conv_kernel=4,
                         use_bias=False, use_conv_bias=True, tie_word_embeddings=True,
                         **SHAPES[args.shape])
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = MambaForCausalLM(config)
    model = model.to(getattr(torch, args.dtype))
    model.save_pretrained(args.out, safe_serialization=True)
    print(json.dumps({"shape": args.shape, "out": args.out, "dtype": args.dtype,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
