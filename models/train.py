#!/usr/bin/python3
"""Trains icd's reference models: byte-level (vocabulary 256) Mamba-1 and
Mamba-2 language models on the Python documentation corpus (models/corpus),
seeded, written as HuggingFace MambaForCausalLM / Mamba2ForCausalLM
checkpoints (and, for Mamba-1, also in the mamba_ssm layout), each with a
model card.

The blocks are written out below in plain PyTorch, step for step as HF's
PyTorch path computes them (MambaMixer.slow_forward, Mamba2Mixer's
torch_forward as a sequential scan), with HF's parameter names, shapes and
initialisation, so that the files are HF's format and layout and need no
transformers to write. Whether they compute what HF computes is not taken on
trust: icd's forward is tested against HF's own logits on the golden fixtures,
and tests/integration/reference_models_test.py requires icd's Evaluate on the
shipped files to give this script's check figure within 1e-4 relative.

  /usr/bin/python3 models/train.py --out models [--models mamba1,mamba2]
      [--steps 1300] [--stop-at N] [--budget-s 1800] [--threads 1] [--seed 20261129]

--steps is the length of the learning-rate schedule; a model trains until it,
--stop-at or --budget-s seconds, whichever comes first. The card records the
steps taken and the command that repeats them (--stop-at, a large budget);
with one thread the run is deterministic on the same PyTorch build. Writes
OUT/<name>/{hf,mamba_ssm}/, card.json and README.md (the card).
"""

import argparse
import collections
import json
import math
import os
import platform
import struct
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
VOCAB = 256
EPS = 1e-5

# Both families at one width and depth; Mamba-2 with two groups of B/C
# (HF and mamba_ssm normalise its gated output differently when groups > 1,
# so it ships in HF's layout only).
ARCHITECTURES = {
    "mamba1": {"name": "mamba1-pydoc", "d_model": 128, "n_layer": 4, "d_state": 16,
               "expand": 2, "d_conv": 4, "dt_rank": 8, "tied": True},
    "mamba2": {"name": "mamba2-pydoc", "d_model": 128, "n_layer": 4, "d_state": 16,
               "expand": 2, "d_conv": 4, "head_dim": 32, "n_groups": 2, "tied": False},
}

SEQ = 128
BATCH = 32
LR = 3e-3
WARMUP = 50
WEIGHT_DECAY = 0.1
CLIP = 1.0
EVAL_SEQ = 1024          # validation windows, each scored from its own start
CHECK_ROWS, CHECK_SEQ = 8, 512  # the slice the tests recompute through icd


# ---------------------------------------------------------------- parameters

def layer_name(i, suffix):
    return "backbone.layers.%d.%s" % (i, suffix)


def init_parameters(family, arch, seed):
    """HF's shapes and initialisation (MambaPreTrainedModel /
    Mamba2PreTrainedModel._init_weights), float32, keyed by HF's names."""
    gen = torch.Generator().manual_seed(seed)
    d_model, inner, n = arch["d_model"], arch["expand"] * arch["d_model"], arch["d_state"]
    params = collections.OrderedDict()

    def linear(out_features, in_features):  # nn.Linear's default (kaiming uniform)
        bound = 1 / math.sqrt(in_features)
        return (torch.rand(out_features, in_features, generator=gen) * 2 - 1) * bound

    def conv(channels, width):
        bound = 1 / math.sqrt(width)
        return ((torch.rand(channels, 1, width, generator=gen) * 2 - 1) * bound,
                (torch.rand(channels, generator=gen) * 2 - 1) * bound)

    def dt_bias(count):  # inverse softplus of dt, log-uniform in [1e-3, 0.1]
        dt = torch.exp(torch.rand(count, generator=gen) * (math.log(0.1) - math.log(1e-3))
                       + math.log(1e-3)).clamp(min=1e-4)
        return dt + torch.log(-torch.expm1(-dt))

    params["backbone.embeddings.weight"] = torch.randn(VOCAB, d_model, generator=gen) * 0.1
    for i in range(arch["n_layer"]):
        params[layer_name(i, "norm.weight")] = torch.ones(d_model)
        mixer = lambda s: layer_name(i, "mixer." + s)  # noqa: E731
        if family == "mamba1":
            rank = arch["dt_rank"]
            params[mixer("in_proj.weight")] = linear(2 * inner, d_model)
            params[mixer("conv1d.weight")], params[mixer("conv1d.bias")] = conv(inner, arch["d_conv"])
            params[mixer("x_proj.weight")] = linear(rank + 2 * n, inner)
            params[mixer("dt_proj.weight")] = (torch.rand(inner, rank, generator=gen) * 2 - 1) * rank ** -0.5
            params[mixer("dt_proj.bias")] = dt_bias(inner)
            params[mixer("A_log")] = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(inner, n).clone()
            params[mixer("D")] = torch.ones(inner)
        else:
            heads = inner // arch["head_dim"]
            conv_dim = inner + 2 * arch["n_groups"] * n
            params[mixer("in_proj.weight")] = linear(inner + conv_dim + heads, d_model)
            params[mixer("conv1d.weight")], params[mixer("conv1d.bias")] = conv(conv_dim, arch["d_conv"])
            params[mixer("dt_bias")] = dt_bias(heads)
            params[mixer("A_log")] = torch.log(torch.arange(1, heads + 1, dtype=torch.float32))
            params[mixer("D")] = torch.ones(heads)
            params[mixer("norm.weight")] = torch.ones(inner)
        params[mixer("out_proj.weight")] = linear(d_model, inner)
    params["backbone.norm_f.weight"] = torch.ones(d_model)
    if not arch["tied"]:
        params["lm_head.weight"] = torch.randn(VOCAB, d_model, generator=gen) * 0.1
    return params


# ---------------------------------------------------------------- forward

def rms_norm(x, weight):
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS) * weight


def causal_conv(x, weight, bias):
    """Depthwise causal conv over time of x [B, L, C]."""
    length = x.size(1)
    out = F.conv1d(x.transpose(1, 2), weight, bias, padding=weight.size(-1) - 1,
                   groups=weight.size(0))
    return out[..., :length].transpose(1, 2)


def mamba1_mixer(p, i, arch, x):
    m = lambda s: p[layer_name(i, "mixer." + s)]  # noqa: E731
    inner, n, rank = arch["expand"] * arch["d_model"], arch["d_state"], arch["dt_rank"]
    projected = F.linear(x, m("in_proj.weight"))
    hidden, gate = projected[..., :inner], projected[..., inner:]
    hidden = F.silu(causal_conv(hidden, m("conv1d.weight"), m("conv1d.bias")))
    ssm = F.linear(hidden, m("x_proj.weight"))
    time_step, b_proj, c_proj = ssm[..., :rank], ssm[..., rank:rank + n], ssm[..., rank + n:]
    delta = F.softplus(F.linear(time_step, m("dt_proj.weight"), m("dt_proj.bias")))  # [B, L, I]
    a_decay = -torch.exp(m("A_log"))                                                 # [I, N]
    delta_x = delta * hidden
    # One time step at a time, nothing [B, L, I, N] materialised: on a CPU
    # the per-step tensors stay in cache.
    state = hidden.new_zeros(hidden.size(0), hidden.size(2), n)
    outputs = []
    for t in range(x.size(1)):
        state = torch.exp(delta[:, t, :, None] * a_decay) * state + \
            delta_x[:, t, :, None] * b_proj[:, t, None, :]
        outputs.append(torch.bmm(state, c_proj[:, t, :, None]).squeeze(-1))
    y = torch.stack(outputs, 1)
    y = (y + hidden * m("D")) * F.silu(gate)
    return F.linear(y, m("out_proj.weight"))


def mamba2_mixer(p, i, arch, x):
    m = lambda s: p[layer_name(i, "mixer." + s)]  # noqa: E731
    inner, n, groups = arch["expand"] * arch["d_model"], arch["d_state"], arch["n_groups"]
    head_dim = arch["head_dim"]
    heads = inner // head_dim
    per_group = heads // groups
    batch, length = x.shape[:2]
    projected = F.linear(x, m("in_proj.weight"))
    gate = projected[..., :inner]
    xbc = projected[..., inner:2 * inner + 2 * groups * n]
    time_step = projected[..., 2 * inner + 2 * groups * n:]
    xbc = F.silu(causal_conv(xbc, m("conv1d.weight"), m("conv1d.bias")))
    hidden = xbc[..., :inner].reshape(batch, length, groups, per_group, head_dim)
    b_proj = xbc[..., inner:inner + groups * n].reshape(batch, length, groups, 1, 1, n)
    c_proj = xbc[..., inner + groups * n:].reshape(batch, length, groups, 1, n)
    delta = F.softplus(time_step + m("dt_bias")).reshape(batch, length, groups, per_group)
    a_decay = -torch.exp(m("A_log")).reshape(groups, per_group)
    decay = torch.exp(delta * a_decay)[..., None, None]                # [B, L, G, K, 1, 1]
    delta_x = (hidden * delta.unsqueeze(-1)).unsqueeze(-1)             # [B, L, G, K, P, 1]
    state = hidden.new_zeros(batch, groups, per_group, head_dim, n)
    outputs = []
    for t in range(length):
        state = decay[:, t] * state + delta_x[:, t] * b_proj[:, t]
        outputs.append(torch.matmul(state, c_proj[:, t, ..., None]).squeeze(-1))
    y = torch.stack(outputs, 1)                                        # [B, L, G, K, P]
    y = y.reshape(batch, length, inner) + hidden.reshape(batch, length, inner) * \
        m("D").repeat_interleave(head_dim)
    # HF's MambaRMSNormGated: gate first, then RMS over the whole d_inner.
    y = rms_norm(y * F.silu(gate), m("norm.weight"))
    return F.linear(y, m("out_proj.weight"))


def logits(p, family, arch, ids):
    hidden = p["backbone.embeddings.weight"][ids]
    mixer = mamba1_mixer if family == "mamba1" else mamba2_mixer
    for i in range(arch["n_layer"]):
        # Residual in float32, as residual_in_fp32.
        hidden = hidden + mixer(p, i, arch, rms_norm(hidden, p[layer_name(i, "norm.weight")]))
    hidden = rms_norm(hidden, p["backbone.norm_f.weight"])
    head = p["backbone.embeddings.weight"] if arch["tied"] else p["lm_head.weight"]
    return F.linear(hidden, head)


def mean_nll(p, family, arch, rows):
    """Mean next-byte NLL (nats) over rows [R, S], as icd's Evaluate computes it."""
    log_probs = torch.log_softmax(logits(p, family, arch, rows)[:, :-1].double(), -1)
    return float(-log_probs.gather(-1, rows[:, 1:, None]).mean())


# ---------------------------------------------------------------- files

def write_safetensors(path, tensors):
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, tensor in tensors.items():
        data = tensor.detach().contiguous().float().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)


def hf_config(family, arch):
    inner = arch["expand"] * arch["d_model"]
    common = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "conv_kernel": arch["d_conv"],
              "dtype": "float32", "expand": arch["expand"], "hidden_act": "silu",
              "hidden_size": arch["d_model"], "initializer_range": 0.1,
              "layer_norm_epsilon": EPS, "num_hidden_layers": arch["n_layer"],
              "rescale_prenorm_residual": False, "residual_in_fp32": True,
              "state_size": arch["d_state"], "tie_word_embeddings": arch["tied"],
              "time_step_floor": 1e-4, "time_step_max": 0.1, "time_step_min": 0.001,
              "use_bias": False, "use_cache": True, "use_conv_bias": True, "vocab_size": VOCAB}
    if family == "mamba1":
        return dict(common, architectures=["MambaForCausalLM"], model_type="mamba",
                    intermediate_size=inner, time_step_rank=arch["dt_rank"],
                    time_step_init_scheme="random", time_step_scale=1.0)
    return dict(common, architectures=["Mamba2ForCausalLM"], model_type="mamba2",
                chunk_size=64, head_dim=arch["head_dim"], n_groups=arch["n_groups"],
                num_heads=inner // arch["head_dim"], time_step_rank=math.ceil(arch["d_model"] / 16),
                time_step_limit=[0.0, {"__float__": "Infinity"}])


def write_hf(root, family, arch, params):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(hf_config(family, arch), f, indent=2, sort_keys=True)
        f.write("\n")
    write_safetensors(os.path.join(root, "model.safetensors"), params)


def write_mamba_ssm(root, arch, params):
    """The Mamba-1 weights as mamba_ssm's save_pretrained writes them: its
    config.json and a torch.save'd OrderedDict, the tied head sharing the
    embedding's storage."""
    os.makedirs(root, exist_ok=True)
    state = collections.OrderedDict()
    for name, tensor in params.items():
        state[name.replace("backbone.embeddings.", "backbone.embedding.")] = tensor.detach().clone()
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    torch.save(state, os.path.join(root, "pytorch_model.bin"))
    config = {"d_model": arch["d_model"], "d_intermediate": 0, "n_layer": arch["n_layer"],
              "vocab_size": VOCAB,
              "ssm_cfg": {"layer": "Mamba1", "d_state": arch["d_state"], "d_conv": arch["d_conv"],
                          "expand": arch["expand"], "dt_rank": arch["dt_rank"], "bias": False,
                          "conv_bias": True},
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
        f.write("\n")


# ---------------------------------------------------------------- training

def read_bytes(name):
    with open(os.path.join(CORPUS, name), "rb") as f:
        return torch.tensor(list(f.read()), dtype=torch.long)


def unigram_bits(train, validation):
    """Bits per byte of validation under train's byte frequencies (add-one)."""
    counts = torch.bincount(train, minlength=VOCAB).double() + 1
    return float(-torch.log2(counts / counts.sum())[validation].mean())


def learning_rate(step, steps):
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = min(1.0, (step - WARMUP) / max(1, steps - WARMUP))
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(family, arch, params, data, steps, stop_at, budget_s, seed, log):
    for tensor in params.values():
        tensor.requires_grad_(True)
    matrices = [t for t in params.values() if t.dim() >= 2]
    others = [t for t in params.values() if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                             {"params": others, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed + 1)
    offsets = torch.arange(SEQ + 1)
    curve, start, taken = [], time.time(), 0
    for step in range(min(steps, stop_at or steps)):
        if time.time() - start > budget_s:
            log("time budget spent after %d steps" % step)
            break
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps)
        window = data[torch.randint(0, data.numel() - SEQ - 1, (BATCH,), generator=gen)[:, None] + offsets]
        out = logits(params, family, arch, window[:, :-1])
        loss = F.cross_entropy(out.reshape(-1, VOCAB), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)
        opt.step()
        taken = step + 1
        if step % 25 == 0 or step == steps - 1:
            bits = float(loss) / math.log(2)
            curve.append([step, round(bits, 4)])
            log("step %d: %.3f bits/byte, %.0f s" % (step, bits, time.time() - start))
    for tensor in params.values():
        tensor.requires_grad_(False)
    return taken, curve, time.time() - start


@torch.no_grad()
def validation_bits(family, arch, params, validation):
    usable = validation.numel() // EVAL_SEQ * EVAL_SEQ
    rows = validation[:usable].view(-1, EVAL_SEQ)
    total, count = 0.0, 0
    for chunk in rows.split(16):
        scored = chunk.size(0) * (EVAL_SEQ - 1)
        total += mean_nll(params, family, arch, chunk) * scored
        count += scored
    return total / count / math.log(2), count


def card_markdown(card):
    a, t, v = card["architecture"], card["training"], card["validation"]
    lines = [
        "# %s" % card["name"], "",
        "A byte-level %s language model (%s parameters) trained by icd's `models/train.py` on "
        "the Python 3.11 documentation as Debian ships it (%s; licence: %s)." % (
            {"mamba1": "Mamba-1", "mamba2": "Mamba-2"}[card["family"]], card["parameters"],
            card["corpus"]["source"], card["corpus"]["license"]), "",
        "| | |", "|---|---|",
        "| layouts | %s |" % ", ".join("`%s/`" % l for l in card["layouts"]),
        "| architecture | %s |" % ", ".join("%s %s" % (k, v_) for k, v_ in a.items() if k != "name"),
        "| vocabulary | 256 (bytes; token id = byte value) |",
        "| training | %d steps (of a %d-step schedule) of %d x %d bytes (%d bytes), AdamW, lr %g, "
        "%s, %.0f s on %s |" % (
            t["steps"], t["schedule_steps"], t["batch"], t["seq"], t["tokens"], t["lr"],
            t["schedule"], t["seconds"], card["provenance"]["machine"]),
        "| validation | **%.4f bits per byte** over %d bytes (windows of %d) |" % (
            v["bits_per_byte"], v["bytes_scored"], v["window"]),
        "| unigram baseline | %.4f bits per byte (training-set byte frequencies) |" % v["unigram_bits_per_byte"],
        "| check slice | mean NLL %.6f nats over the first %d x %d bytes of validation.txt |" % (
            card["check"]["mean_nll"], card["check"]["rows"], card["check"]["seq"]),
        "| provenance | commit %s, %s, Python %s, torch %s |" % (
            card["provenance"]["commit"], card["provenance"]["date"],
            card["provenance"]["python"], card["provenance"]["torch"]),
        "| reproduce | `%s` |" % card["provenance"]["command"], "",
        "The check slice is what `tests/integration/reference_models_test.py` recomputes through "
        "icd's Evaluate in every layout (within 1e-4 relative). Training loss (bits per byte) "
        "every 25 steps is in card.json.", ""]
    return "\n".join(lines)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def git_commit():
    out = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def keep_freed_memory():
    """Re-executes this script with glibc told to keep freed memory: every
    step allocates the same tensors again, and fresh pages (mmap, or a heap
    trimmed back) cost page faults that made steps 4x slower here."""
    if os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="100000000000",
               MALLOC_MMAP_THRESHOLD_="33554432", MALLOC_TOP_PAD_="268435456")
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main():
    keep_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--models", default="mamba1,mamba2")
    ap.add_argument("--steps", type=int, default=1300,
                    help="the length of the learning-rate schedule")
    ap.add_argument("--stop-at", type=int, default=0,
                    help="stop after this many steps (0: --steps), schedule unchanged")
    ap.add_argument("--budget-s", type=float, default=1800)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=20261129)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    commit = git_commit()  # the code that trains, before anything else is committed

    train_bytes, validation = read_bytes("train.txt"), read_bytes("validation.txt")
    with open(os.path.join(CORPUS, "manifest.json")) as f:
        corpus = json.load(f)
    baseline = unigram_bits(train_bytes, validation)
    check_rows = validation[:CHECK_ROWS * CHECK_SEQ].view(CHECK_ROWS, CHECK_SEQ)

    for family in args.models.split(","):
        arch = ARCHITECTURES[family]
        name = arch["name"]
        root = os.path.join(args.out, name)
        os.makedirs(root, exist_ok=True)

        def log(msg):
            print("[%s] %s" % (name, msg), flush=True)

        params = init_parameters(family, arch, args.seed)
        count = sum(t.numel() for t in params.values())
        log("%d parameters, torch %s, %d thread(s)" % (count, torch.__version__, args.threads))
        taken, curve, seconds = train(family, arch, params, train_bytes, args.steps,
                                      args.stop_at, args.budget_s, args.seed, log)
        bits, scored = validation_bits(family, arch, params, validation)
        with torch.no_grad():
            check = mean_nll(params, family, arch, check_rows)
        log("validation %.4f bits/byte over %d bytes (unigram %.4f); check NLL %.6f" % (
            bits, scored, baseline, check))

        write_hf(os.path.join(root, "hf"), family, arch, params)
        layouts = ["hf"]
        if family == "mamba1":
            write_mamba_ssm(os.path.join(root, "mamba_ssm"), arch, params)
            layouts.append("mamba_ssm")
        card = {
            "name": name, "family": family, "layouts": layouts,
            "architecture": {k: v for k, v in arch.items() if k != "name"},
            "parameters": count,
            "corpus": {"source": corpus["source"], "license": corpus["license"],
                       "train_sha256": corpus["train"]["sha256"],
                       "validation_sha256": corpus["validation"]["sha256"]},
            "training": {"steps": taken, "schedule_steps": args.steps, "seq": SEQ, "batch": BATCH, "tokens": taken * SEQ * BATCH,
                         "lr": LR, "warmup": WARMUP, "schedule": "linear warm-up, cosine to 0.1x",
                         "weight_decay": WEIGHT_DECAY, "clip": CLIP, "seed": args.seed,
                         "optimizer": "AdamW(0.9, 0.95)", "precision": "float32",
                         "seconds": round(seconds, 1), "loss_bits_per_byte": curve},
            "validation": {"bits_per_byte": round(bits, 5), "bytes_scored": scored,
                           "window": EVAL_SEQ, "unigram_bits_per_byte": round(baseline, 5)},
            "check": {"rows": CHECK_ROWS, "seq": CHECK_SEQ, "mean_nll": check,
                      "what": "mean next-byte NLL (nats), float32 forward, over the first "
                              "rows x seq bytes of validation.txt as rows"},
            "provenance": {"commit": commit, "machine": "%s, %d thread(s)" % (
                               cpu_name(), args.threads),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "command": "/usr/bin/python3 models/train.py --models %s --steps %d "
                                      "--stop-at %d --budget-s 1e9 --threads %d --seed %d" % (
                                          family, args.steps, taken, args.threads, args.seed),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        }
        with open(os.path.join(root, "card.json"), "w") as f:
            json.dump(card, f, indent=1)
            f.write("\n")
        with open(os.path.join(root, "README.md"), "w") as f:
            f.write(card_markdown(card))


if __name__ == "__main__":
    sys.exit(main())
