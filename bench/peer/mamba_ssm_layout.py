#!/usr/bin/env python3
"""Writes a HuggingFace Mamba-1 or Mamba-2 checkpoint (bench/make_random_mamba.py's)
in the mamba_ssm layout, as mamba_ssm's save_pretrained writes it (and as
models/train.py's write_mamba_ssm does): config.json (d_model, n_layer, ssm_cfg,
...) and a torch.save'd OrderedDict in pytorch_model.bin, the embedding renamed
backbone.embeddings -> backbone.embedding and the tied lm_head.weight sharing its
storage. Every other name is already mamba_ssm's (Mamba2's mixer: in_proj,
conv1d, dt_bias, A_log, D, norm, out_proj). Tensors are copied bit for bit
(dtype unchanged). icd reads this layout too, so icd and mamba_ssm load the very
same file.

  mamba_ssm_layout.py --hf DIR --out DIR

The HF model_type picks the mixer: "mamba" -> ssm_cfg.layer Mamba1, "mamba2" ->
Mamba2 (mamba_ssm/modules/mamba2.py's constructor arguments).
"""
import argparse
import collections
import json
import math
import os
import time

import torch
from safetensors.torch import load_file

# Mamba2's mixer tensors in both layouts (HF Mamba2Mixer, mamba_ssm Mamba2)
MAMBA2_MIXER = {"in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"}


def mamba1_ssm_cfg(hf):
    d_model = hf["hidden_size"]
    rank = hf.get("time_step_rank", "auto")
    rank = math.ceil(d_model / 16) if rank == "auto" else int(rank)
    return {"layer": "Mamba1", "d_state": hf["state_size"], "d_conv": hf["conv_kernel"],
            "expand": hf["expand"], "dt_rank": rank, "bias": bool(hf["use_bias"]),
            "conv_bias": bool(hf["use_conv_bias"])}


def mamba2_ssm_cfg(hf):
    """mamba_ssm's Mamba2 with HF Mamba2's function: the gated RMSNorm (HF's
    modeling applies it whatever its rms_norm says), the gate before the norm
    (norm_before_gate=False), one D per head (D_has_hdim=False), no gated-MLP part
    (d_ssm = d_inner). HF's gated RMSNorm normalises over the whole d_inner,
    mamba_ssm's over each group of d_inner/ngroups channels: with ngroups=1 the
    two are the same function, so only one group is accepted. mamba_ssm
    hard-codes that norm's eps at 1e-5 and has no norm_epsilon in MambaConfig
    (MixerModel's default, 1e-5, for the block norms), hence the eps check."""
    d_inner = int(hf["expand"] * hf["hidden_size"])
    assert hf["n_groups"] == 1, "HF's whole-width gated norm equals mamba_ssm's grouped one only for one group"
    assert hf["num_heads"] * hf["head_dim"] == d_inner, (hf["num_heads"], hf["head_dim"], d_inner)
    assert hf.get("layer_norm_epsilon", 1e-5) == 1e-5, "mamba_ssm's Mamba-2 norms use eps 1e-5"
    cfg = {"layer": "Mamba2", "d_state": hf["state_size"], "d_conv": hf["conv_kernel"],
           "expand": hf["expand"], "headdim": hf["head_dim"], "ngroups": hf["n_groups"],
           "chunk_size": hf.get("chunk_size", 256), "rmsnorm": True, "norm_before_gate": False,
           "D_has_hdim": False, "bias": bool(hf["use_bias"]), "conv_bias": bool(hf["use_conv_bias"])}
    # mamba_ssm's default dt_limit is (0.0, inf) and only that exact tuple skips
    # the clamp; inf is no valid JSON for icd, so the default stays implicit
    # transformers writes inf as {"__float__": "Infinity"}
    limit = tuple(float(x["__float__"]) if isinstance(x, dict) else float(x)
                  for x in hf.get("time_step_limit", (0.0, math.inf)))
    if limit != (0.0, math.inf):
        assert all(math.isfinite(x) for x in limit), f"time_step_limit {limit}: inf is not valid JSON"
        cfg["dt_limit"] = list(limit)
    return cfg


def check_mamba2_names(state, hf):
    names = {n.split(".mixer.", 1)[1] for n in state if n.startswith("backbone.layers.0.mixer.")}
    want = set(MAMBA2_MIXER) | ({"conv1d.bias"} if hf["use_conv_bias"] else set()) | (
        {"in_proj.bias", "out_proj.bias"} if hf["use_bias"] else set())
    assert names == want, f"layer 0's mixer tensors {sorted(names)}, mamba_ssm's Mamba2 has {sorted(want)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    with open(os.path.join(args.hf, "config.json")) as f:
        hf = json.load(f)  # json reads HF's Infinity (time_step_limit) as float inf
    model_type = hf.get("model_type")
    assert model_type in ("mamba", "mamba2"), model_type
    assert hf.get("tie_word_embeddings", True), "untied heads are not handled here"
    tensors = load_file(os.path.join(args.hf, "model.safetensors"))
    state = collections.OrderedDict()
    for name in sorted(tensors, key=lambda n: (n.count("."), n)):
        state[name.replace("backbone.embeddings.", "backbone.embedding.")] = tensors[name]
    if "lm_head.weight" in state:  # HF saves a tied head once; if it did not, it must be the embedding
        assert torch.equal(state["lm_head.weight"], state["backbone.embedding.weight"]), "lm_head is not tied"
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    if model_type == "mamba2":
        check_mamba2_names(state, hf)
        ssm_cfg = mamba2_ssm_cfg(hf)
    else:
        ssm_cfg = mamba1_ssm_cfg(hf)
    os.makedirs(args.out, exist_ok=True)
    torch.save(state, os.path.join(args.out, "pytorch_model.bin"))
    # Only MambaConfig's fields: peer_bench.py builds MambaConfig(**config.json).
    config = {"d_model": hf["hidden_size"], "d_intermediate": 0, "n_layer": hf["num_hidden_layers"],
              "vocab_size": hf["vocab_size"], "ssm_cfg": ssm_cfg,
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
              "residual_in_fp32": bool(hf.get("residual_in_fp32", True)),
              "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    assert config["vocab_size"] % 8 == 0, "padding would change the embedding's shape"
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
        f.write("\n")
    print(json.dumps({"hf": args.hf, "out": args.out, "family": "mamba1" if model_type == "mamba" else "mamba2",
                      "tensors": len(state), "dtype": str(state["backbone.embedding.weight"].dtype),
                      "layer_norm_epsilon": hf.get("layer_norm_epsilon"),
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
