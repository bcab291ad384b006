#!/usr/bin/env python3
"""Trains icd's reference models: byte-level (vocabulary 256) HuggingFace
MambaForCausalLM and Mamba2ForCausalLM on the Python documentation corpus
(models/corpus), seeded, and writes each in every layout that computes the
same function, with the figures its model card needs.

Runs where PyTorch and transformers are (the H200 behind the device tool):

  python3 models/train.py --out OUT [--models mamba1,mamba2]
      [--mamba1-steps N] [--mamba2-steps N] [--budget-s S]

A model trains for its --*-steps, or until its share of --budget-s is spent,
whichever comes first; the card records the steps taken, and rerunning with
those steps reproduces it (up to GPU non-determinism). Writes:

  OUT/<name>/hf/                  config.json + model.safetensors (save_pretrained)
  OUT/<name>/mamba_ssm/           config.json + pytorch_model.bin (Mamba-1 only)
  OUT/<name>/card.json            architecture, parameters, corpus, steps, losses,
                                  validation bits per byte, the unigram baseline,
                                  the check slice's mean NLL, versions, machine
"""

import argparse
import collections
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import transformers
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
VOCAB = 256

# Same width and depth for both families; Mamba-2 with two groups of B/C
# (the layout HF and mamba_ssm normalise differently, hence HF layout only).
ARCHITECTURES = {
    "mamba1": dict(family="mamba1", config=dict(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, state_size=16, expand=2,
        conv_kernel=4, use_bias=False, use_conv_bias=True, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)),
    "mamba2": dict(family="mamba2", config=dict(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, state_size=32, expand=2,
        num_heads=16, head_dim=32, n_groups=2, conv_kernel=4, chunk_size=64,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)),
}
NAMES = {"mamba1": "mamba1-pydoc", "mamba2": "mamba2-pydoc"}

# Training: random windows of the training text.
SEQ = 256
BATCH = 128
LR = 2e-3
WARMUP = 100
WEIGHT_DECAY = 0.1
CLIP = 1.0
# Validation: non-overlapping windows, each scored from its own start.
EVAL_SEQ = 1024
# The check slice the tests recompute through icd: the first CHECK_ROWS x
# CHECK_SEQ bytes of validation.txt, as rows.
CHECK_ROWS = 8
CHECK_SEQ = 512


def read_bytes(name):
    with open(os.path.join(CORPUS, name), "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()


def unigram_bits(train, validation):
    """Cross-entropy of validation under train's byte frequencies (add-one)."""
    counts = torch.bincount(train, minlength=VOCAB).double() + 1
    log_p = torch.log2(counts / counts.sum())
    return float(-log_p[validation].mean())


def build(arch, seed):
    torch.manual_seed(seed)
    if arch["family"] == "mamba1":
        return MambaForCausalLM(MambaConfig(**arch["config"]))
    return Mamba2ForCausalLM(Mamba2Config(**arch["config"]))


def schedule(step, steps):
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(model, data, steps, budget_s, seed, device, log):
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": other, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(seed)
    data = data.to(device)
    offsets = torch.arange(SEQ + 1, device=device)
    losses, start, taken = [], time.time(), 0
    for step in range(steps):
        if time.time() - start > budget_s:
            log("time budget spent after %d steps" % step)
            break
        for group in opt.param_groups:
            group["lr"] = LR * schedule(step, steps)
        starts = torch.randint(0, data.numel() - SEQ - 1, (BATCH,), generator=gen).to(device)
        window = data[starts[:, None] + offsets]
        out = model(input_ids=window[:, :-1], labels=None)
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB).float(),
                                                 window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        taken = step + 1
        if step % 50 == 0 or step == steps - 1:
            value = float(loss)
            losses.append([step, round(value / math.log(2), 4)])
            log("step %d loss %.4f bits/byte %.3f  %.1f s" % (step, value, value / math.log(2),
                                                             time.time() - start))
    return taken, losses, time.time() - start


@torch.no_grad()
def mean_nll(model, rows):
    """Mean next-byte NLL in nats over rows [R, S], as icd's Evaluate computes it."""
    logits = model(input_ids=rows).logits.double()
    log_probs = torch.log_softmax(logits[:, :-1], -1)
    return float(-log_probs.gather(-1, rows[:, 1:, None]).mean())


@torch.no_grad()
def validation_bits(model, validation, device):
    usable = validation.numel() // EVAL_SEQ * EVAL_SEQ
    rows = validation[:usable].view(-1, EVAL_SEQ).to(device)
    total, count = 0.0, 0
    for chunk in rows.split(32):
        n = chunk.size(0) * (EVAL_SEQ - 1)
        total += mean_nll(model, chunk) * n
        count += n
    return total / count / math.log(2), count


def mamba_ssm_copy(model, arch, path):
    """Writes the Mamba-1 weights in the mamba_ssm layout: its config.json and
    a torch.save'd OrderedDict, the tied head sharing the embedding's storage."""
    cfg = arch["config"]
    hf = model.state_dict()
    state = collections.OrderedDict()
    for key, value in hf.items():
        if key == "lm_head.weight":
            continue
        state[key.replace("backbone.embeddings.", "backbone.embedding.")] = value.cpu().clone()
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    os.makedirs(path, exist_ok=True)
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    config = {
        "d_model": cfg["hidden_size"], "d_intermediate": 0, "n_layer": cfg["num_hidden_layers"],
        "vocab_size": VOCAB,
        "ssm_cfg": {"layer": "Mamba1", "d_state": cfg["state_size"], "d_conv": cfg["conv_kernel"],
                    "expand": cfg["expand"], "dt_rank": model.config.time_step_rank,
                    "bias": cfg["use_bias"], "conv_bias": cfg["use_conv_bias"]},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def git_commit():
    if os.environ.get("ICD_COMMIT"):  # a copied tree's git metadata may be stale
        return os.environ["ICD_COMMIT"]
    try:
        return subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="mamba1,mamba2")
    ap.add_argument("--mamba1-steps", type=int, default=3000)
    ap.add_argument("--mamba2-steps", type=int, default=3000)
    ap.add_argument("--budget-s", type=float, default=420,
                    help="training seconds for all models together, split by step counts")
    ap.add_argument("--seed", type=int, default=20261129)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # TF32 for training speed; evaluation below is full float32.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    train_bytes, validation = read_bytes("train.txt"), read_bytes("validation.txt")
    with open(os.path.join(CORPUS, "manifest.json")) as f:
        corpus = json.load(f)
    baseline = unigram_bits(train_bytes, validation)
    check_rows = validation[:CHECK_ROWS * CHECK_SEQ].view(CHECK_ROWS, CHECK_SEQ)

    families = args.models.split(",")
    steps = {"mamba1": args.mamba1_steps, "mamba2": args.mamba2_steps}
    share = {f: args.budget_s * steps[f] / sum(steps[g] for g in families) for f in families}
    for family in families:
        arch = ARCHITECTURES[family]
        name = NAMES[family]
        root = os.path.join(args.out, name)
        os.makedirs(root, exist_ok=True)
        logfile = open(os.path.join(args.out, name + ".log"), "w")

        def log(msg):
            print("[%s] %s" % (name, msg), flush=True)
            print(msg, file=logfile, flush=True)

        model = build(arch, args.seed)
        params = sum(p.numel() for p in model.parameters())
        log("parameters %d; transformers %s torch %s; device %s" % (
            params, transformers.__version__, torch.__version__, device))
        taken, losses, seconds = train(model, train_bytes, steps[family], share[family],
                                       args.seed, device, log)

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        model.eval()
        bits, scored = validation_bits(model, validation, device)
        model.float().cpu()
        check_nll = mean_nll(model, check_rows)  # HF's PyTorch path, float32, CPU
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log("validation %.4f bits/byte over %d bytes (unigram %.4f); check NLL %.6f" % (
            bits, scored, baseline, check_nll))

        model.save_pretrained(os.path.join(root, "hf"))
        layouts = ["hf"]
        if family == "mamba1":
            mamba_ssm_copy(model, arch, os.path.join(root, "mamba_ssm"))
            layouts.append("mamba_ssm")
        card = {
            "name": name, "family": family, "layouts": layouts,
            "config": arch["config"], "parameters": params,
            "corpus": {"source": corpus["source"], "license": corpus["license"],
                       "train_sha256": corpus["train"]["sha256"],
                       "validation_sha256": corpus["validation"]["sha256"]},
            "training": {"steps": taken, "planned_steps": steps[family], "seq": SEQ,
                         "batch": BATCH, "tokens": taken * SEQ * BATCH, "lr": LR,
                         "warmup": WARMUP, "schedule": "linear warmup, cosine to 0.1x",
                         "weight_decay": WEIGHT_DECAY, "clip": CLIP, "seed": args.seed,
                         "optimizer": "AdamW(0.9, 0.95)", "precision": "float32, TF32 matmuls",
                         "seconds": round(seconds, 1), "loss_bits_per_byte": losses},
            "validation": {"bits_per_byte": round(bits, 5), "bytes_scored": scored,
                           "window": EVAL_SEQ, "unigram_bits_per_byte": round(baseline, 5),
                           "precision": "float32 (no TF32) on %s" % device},
            "check": {"rows": CHECK_ROWS, "seq": CHECK_SEQ, "mean_nll": check_nll,
                      "what": "mean next-byte NLL (nats) of HF float32 on CPU over the first "
                              "rows x seq bytes of validation.txt as rows; icd's Evaluate "
                              "must give the same within 1e-4 relative"},
            "provenance": {"commit": git_commit(), "machine": platform.node(),
                           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "",
                           "python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__,
                           "command": "python3 models/train.py --out OUT --models %s --%s-steps %d "
                                                 "--budget-s 100000 --seed %d"
                                      % (family, family, taken, args.seed),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        }
        with open(os.path.join(root, "card.json"), "w") as f:
            json.dump(card, f, indent=1)
            f.write("\n")
        log(json.dumps(card["validation"]))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
