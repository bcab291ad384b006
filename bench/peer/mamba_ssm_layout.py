#!/usr/bin/env python3
"""Writes a HuggingFace Mamba-1 checkpoint (bench/make_random_mamba.py's) in the
mamba_ssm layout, as mamba_ssm's save_pretrained writes it (and as
models/train.py's write_mamba_ssm does): config.json (d_model, n_layer, ssm_cfg,
...) and a torch.save'd OrderedDict in pytorch_model.bin, the embedding renamed
backbone.embeddings -> backbone.embedding and the tied lm_head.weight sharing its
storage. Tensors are copied bit for bit (dtype unchanged). icd reads this layout
too, so icd and mamba_ssm load the very same file.

  mamba_ssm_layout.py --hf DIR --out DIR
"""
import argparse
import collections
import json
import math
import os
import time

import torch
from safetensors.torch import load_file


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    with open(os.path.join(args.hf, "config.json")) as f:
        hf = json.load(f)
    assert hf.get("model_type") == "mamba", hf.get("model_type")
    assert hf.get("tie_word_embeddings", True), "untied heads are not handled here"
    d_model = hf["hidden_size"]
    rank = hf.get("time_step_rank", "auto")
    rank = math.ceil(d_model / 16) if rank == "auto" else int(rank)
    tensors = load_file(os.path.join(args.hf, "model.safetensors"))
    state = collections.OrderedDict()
    for name in sorted(tensors, key=lambda n: (n.count("."), n)):
        state[name.replace("backbone.embeddings.", "backbone.embedding.")] = tensors[name]
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    os.makedirs(args.out, exist_ok=True)
    torch.save(state, os.path.join(args.out, "pytorch_model.bin"))
    config = {"d_model": d_model, "d_intermediate": 0, "n_layer": hf["num_hidden_layers"],
              "vocab_size": hf["vocab_size"],
              "ssm_cfg": {"layer": "Mamba1", "d_state": hf["state_size"], "d_conv": hf["conv_kernel"],
                          "expand": hf["expand"], "dt_rank": rank, "bias": bool(hf["use_bias"]),
                          "conv_bias": bool(hf["use_conv_bias"])},
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
              "residual_in_fp32": bool(hf.get("residual_in_fp32", True)),
              "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    assert config["vocab_size"] % 8 == 0, "padding would change the embedding's shape"
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
        f.write("\n")
    print(json.dumps({"hf": args.hf, "out": args.out, "tensors": len(state),
                      "dtype": str(state["backbone.embedding.weight"].dtype),
                      "layer_norm_epsilon": hf.get("layer_norm_epsilon"),
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
