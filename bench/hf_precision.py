#!/usr/bin/env python3
"""How far HuggingFace's own bfloat16 forward is from its float32 forward on
the same checkpoint and tokens: the rounding noise a bf16 model carries
before icd touches it. A permutation changes the order of GEMM reductions,
hence the rounding, so a bf16 check cannot be tighter than this.

  hf_precision.py --model DIR [--tokens 128]
"""
import argparse
import json

import torch
from transformers import MambaForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    try:
        model = MambaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    except TypeError:
        model = MambaForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model = model.cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens),
                        generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        wide = model(ids, use_cache=False).logits.float()
        narrow = model.to(torch.bfloat16)(ids, use_cache=False).logits.float()
    rel = ((narrow - wide).norm() / wide.norm()).item()
    top1 = (narrow.argmax(-1) == wide.argmax(-1)).float().mean().item()
    print(json.dumps({"bench": "hf_precision", "model": args.model, "tokens": args.tokens,
                      "bf16_vs_fp32_rel_l2": rel, "bf16_vs_fp32_top1": top1,
                      "fp32_logit_rms": wide.pow(2).mean().sqrt().item()}), flush=True)


if __name__ == "__main__":
    main()
