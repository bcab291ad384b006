#!/usr/bin/env python3
"""mamba_ssm (state-spaces/mamba's MambaLMHeadModel on its own kernels: Mamba-1's
CUDA ones built forward-only by build_peer.py, Mamba-2's Triton ones) on the same
checkpoints and in the same run as icd: logits against icd's (and HF's PyTorch
path), prefill and decode latency, and a torch.profiler table of each.

  peer_bench.py --models DIR [--family mamba1|mamba2] [--shapes 130m 2.8b] --out DIR
                [--icd-logits DIR] [--ids FILE] [--seq-len 2048]
                [--prefill-iters 30] [--decode-steps 200] [--warmup 5]
                [--hf-shapes 130m] [--no-profile] [--skip-timing] [--commit SHA]

DIR/mamba-<shape>/mamba_ssm (mamba1; shapes 130m 2.8b by default) or
DIR/mamba2-<shape>/mamba_ssm (mamba2; 130m 2.7b) is the checkpoint
(mamba_ssm_layout.py), its parent the HF original. --icd-logits holds
icd-<tag>-<dtype>.json, `icdctl --json evaluate --logits` on the token ids of --ids
(a JSON list); <tag>, which also names the traces, is <shape> for mamba1 and
mamba2-<shape> for mamba2. Every record says its family. Timing as icd's MeasureLatency:
CUDA events around each sample (host launch included), a device sync after it,
warm-up samples dropped; median, p10, p90 and the 95% interval of the median by
binomial order statistics (server/core/src/forward/latency_stats.cc, ported). Prefill: one
forward over [1, seq_len] with logits for every position. Decode: after a prefill of
seq_len tokens into the state, one token per sample, logits of that token;
cuda_graphs=true replays the step captured by mamba_ssm's own update_graph_cache
(as generate(cg=True) does), false runs the step eagerly. Prints one JSON line per
measurement; writes them to --out/peer.jsonl too.
"""
import argparse
import json
import math
import os
import sys
import time
import traceback
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PEERS = os.path.join(REPO, "peers")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

OUT_LINES = []


def emit(record, out_dir):
    record = dict(record)
    line = json.dumps(record)
    print(line, flush=True)
    with open(os.path.join(out_dir, "peer.jsonl"), "a") as f:
        f.write(line + "\n")


# ------------------------------------------------------------ statistics (icd's)

def quantile(s, q):
    position = (len(s) - 1) * q
    below = int(math.floor(position))
    above = min(below + 1, len(s) - 1)
    return s[below] + (position - below) * (s[above] - s[below])


def median_interval95(n):
    if n < 6:
        return 0, n - 1
    log_total = math.lgamma(n + 1) - n * math.log(2.0)
    below, rank = 0.0, 0
    for j in range(n // 2):
        below += math.exp(log_total - math.lgamma(j + 1) - math.lgamma(n - j + 1))
        if below > 0.025:
            break
        rank = j + 1
    return rank - 1, n - rank


def summarize(samples):
    s = sorted(samples)
    lo, hi = median_interval95(len(s))
    return {"median_ms": quantile(s, 0.5), "p10_ms": quantile(s, 0.1), "p90_ms": quantile(s, 0.9),
            "ci95_ms": [s[lo], s[hi]], "samples": len(s)}


def timed(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), result


# ------------------------------------------------------------ importing the peer

def import_mamba_ssm(build_dir, need_mamba2=False):
    """mamba_ssm and causal_conv1d from peers/ with the built extensions. If the
    package's __init__ fails on a module the Mamba-1 path does not use (Mamba2/3's
    Triton or CuTe code, flash-attn, transformers' hub helpers), those modules are
    replaced by empty stand-ins and the import retried; the stand-ins are reported.
    need_mamba2 (a Mamba-2 run): mamba_ssm.modules.mamba2 is never replaced (its
    Triton SSD kernels, RMSNormGated and causal_conv1d are what is measured), so a
    failure there raises. Mamba-2's own fast paths (mamba2.py's optional imports)
    are reported whenever that module is the real one."""
    for path in (build_dir, os.path.join(PEERS, "causal-conv1d"), os.path.join(PEERS, "mamba")):
        if path not in sys.path:
            sys.path.insert(0, path)
    import selective_scan_cuda  # noqa: F401  (the built extension)
    import causal_conv1d_cuda  # noqa: F401
    stubs = []
    try:
        import mamba_ssm  # noqa: F401
    except Exception:  # noqa: BLE001
        first = traceback.format_exc()
        print("mamba_ssm import failed; retrying with stand-ins:\n" + first, file=sys.stderr, flush=True)
        for name in list(sys.modules):
            if name == "mamba_ssm" or name.startswith("mamba_ssm."):
                del sys.modules[name]

        class Missing:
            def __init__(self, *a, **k):
                raise RuntimeError("stand-in: not built in this forward-only harness")

        class Stub(types.ModuleType):
            def __getattr__(self, attr):
                if attr.startswith("__"):
                    raise AttributeError(attr)
                return Missing

        for name in ("mamba_ssm.modules.mamba3", "mamba_ssm.modules.mamba2", "mamba_ssm.modules.mha",
                     "mamba_ssm.utils.hf", "mamba_ssm.distributed.tensor_parallel"):
            if need_mamba2 and name == "mamba_ssm.modules.mamba2":
                continue  # (tensor_parallel's stand-in is fine: Mamba2 uses it only with a process group)
            sys.modules[name] = Stub(name)
            stubs.append(name)
        import mamba_ssm  # noqa: F401  (with need_mamba2, raises if modules.mamba2 is what failed)
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.utils import generation
    import mamba_ssm.modules.mamba_simple as simple
    import mamba_ssm.ops.selective_scan_interface as ssi
    paths = {"causal_conv1d_fn": simple.causal_conv1d_fn is not None,
             "causal_conv1d_update": simple.causal_conv1d_update is not None,
             "selective_state_update": simple.selective_state_update is not None,
             "triton_layer_norm": simple.RMSNorm is not None,
             "selective_scan_cuda": getattr(ssi, "selective_scan_cuda", None) is not None}
    if "mamba_ssm.modules.mamba2" not in stubs:
        # Mamba2.forward/step fall back to nn.Conv1d / a torch conv step and a
        # torch SSM step where these are None (mamba_chunk_scan_combined and
        # RMSNormGated are mamba2.py's hard imports: present if it imported)
        import mamba_ssm.modules.mamba2 as m2
        paths.update({"mamba2.causal_conv1d_fn": m2.causal_conv1d_fn is not None,
                      "mamba2.causal_conv1d_update": m2.causal_conv1d_update is not None,
                      "mamba2.selective_state_update": m2.selective_state_update is not None})
    # Mamba-2's float32 forward runs Triton tl.dot: TF32 unless this says "ieee"
    return MambaConfig, MambaLMHeadModel, generation, {"stand_ins": stubs, "fast_paths": paths,
                                                       "version": mamba_ssm.__version__,
                                                       "triton_f32_default": os.environ.get("TRITON_F32_DEFAULT")}


def load_peer(classes, ckpt_dir, dtype):
    MambaConfig, MambaLMHeadModel = classes
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        config = MambaConfig(**json.load(f))
    model = MambaLMHeadModel(config, device="cuda", dtype=dtype)
    state = torch.load(os.path.join(ckpt_dir, "pytorch_model.bin"), map_location="cuda", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=True)
    del state
    return model.eval()


# ------------------------------------------------------------ logits

def read_icd_logits(path):
    with open(path) as f:
        r = json.load(f)
    shape = [int(x) for x in r["shape"]]
    return torch.tensor(r["logits"], dtype=torch.float32).reshape(shape)


def compare(a, b):
    """a against reference b, both [B, L, V] float."""
    a, b = a.double().cpu(), b.double().cpu()
    rel = ((a - b).norm() / b.norm()).item()
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    return {"rel_l2": rel, "top1_agreement": top1, "max_abs": (a - b).abs().max().item()}


HF_CLASSES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}


def hf_logits(hf_dir, ids, dtype):
    """HF's logits, the class by config.json's model_type, and which path HF took:
    peers/ is on sys.path by now, so HF may find mamba_ssm and causal_conv1d and
    run their kernels instead of its PyTorch path (its modeling module's
    is_fast_path_available, as its mixer's forward reads it; None if absent)."""
    import transformers
    with open(os.path.join(hf_dir, "config.json")) as f:
        model_class = getattr(transformers, HF_CLASSES[json.load(f)["model_type"]])
    try:
        model = model_class.from_pretrained(hf_dir, dtype=dtype)
    except TypeError:
        model = model_class.from_pretrained(hf_dir, torch_dtype=dtype)
    model = model.cuda().eval()
    with torch.no_grad():
        out = model(ids, use_cache=False).logits.float()
    fast = getattr(sys.modules[type(model).__module__], "is_fast_path_available", None)
    del model
    return out, {"hf_class": model_class.__name__, "hf_fast_path": None if fast is None else bool(fast)}


# ------------------------------------------------------------ timing

def time_prefill(model, ids, warmup, iters):
    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            ms, _ = timed(lambda: model(ids))
            if i >= warmup:
                times.append(ms)
    return times


def time_decode(model, generation, prompt, steps_ids, warmup, iters, cuda_graphs, dtype):
    """Prefill the prompt into the state, then time single-token steps."""
    seq_len = prompt.shape[1]
    max_seqlen = seq_len + warmup + iters + 8
    # inference_mode, as mamba_ssm's decode() and update_graph_cache run (the
    # graph cache's tensors are inference tensors)
    with torch.inference_mode():
        if cuda_graphs:
            cache = generation.update_graph_cache(model, None, batch_size=1, seqlen_og=seq_len,
                                                  max_seqlen=max_seqlen, decoding_seqlens=(1,),
                                                  dtype=dtype)
            params = cache.inference_params
            params.reset(max_seqlen, 1)

            def step(tok):
                pos = torch.full((1, 1), params.seqlen_offset, dtype=torch.long, device="cuda")
                return lambda: cache.run(tok, pos, params.seqlen_offset)
        else:
            params = generation.InferenceParams(max_seqlen=max_seqlen, max_batch_size=1)

            def step(tok):
                pos = torch.full((1, 1), params.seqlen_offset, dtype=torch.long, device="cuda")
                return lambda: model(tok, position_ids=pos, inference_params=params,
                                     num_last_tokens=1).logits
        model(prompt, inference_params=params, num_last_tokens=1)
        params.seqlen_offset += seq_len
        times, first = [], None
        for i in range(warmup + iters):
            ms, logits = timed(step(steps_ids[i:i + 1]))
            params.seqlen_offset += 1
            if i == 0:
                first = logits.float().reshape(1, -1).clone()
            if i >= warmup:
                times.append(ms)
    return times, first


def decode_matches_forward(model, generation, ids, dtype):
    """Logits of the last token by a step after a prefill of the others (eager and
    graph) against the full forward's last position."""
    with torch.no_grad():
        full = model(ids).logits[:, -1].float()
        out = {}
        for cg in (False, True):
            _, first = time_decode(model, generation, ids[:, :-1], ids[0, -1:].reshape(1, 1), 0, 1, cg, dtype)
            out["graph" if cg else "eager"] = compare(first.unsqueeze(0), full.unsqueeze(0))
    return out


def profile_peer(model, generation, prompt, steps_ids, dtype, out_dir, shape):
    """shape: the tag (mamba2-<shape> for Mamba-2) that names the traces and tables."""
    from torch.profiler import ProfilerActivity, profile, record_function
    sys.path.insert(0, HERE)
    import trace_table
    tables = []
    with torch.no_grad():
        for _ in range(2):
            model(prompt)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                with record_function("mamba_ssm_prefill"):
                    model(prompt)
                    torch.cuda.synchronize()
        path = os.path.join(out_dir, f"trace-mamba_ssm-{shape}-prefill.json")
        prof.export_chrome_trace(path)
        tables.append(trace_table.analyse(path, "mamba_ssm_prefill", f"mamba_ssm {shape} prefill"))
        # decode: eager steps (a graph replay hides its kernels from the op view)
        seq_len = prompt.shape[1]
        params = generation.InferenceParams(max_seqlen=seq_len + 64, max_batch_size=1)
        model(prompt, inference_params=params, num_last_tokens=1)
        params.seqlen_offset += seq_len
        for i in range(5):
            model(steps_ids[i:i + 1], inference_params=params, num_last_tokens=1)
            params.seqlen_offset += 1
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(5, 25):
                with record_function("mamba_ssm_decode_step"):
                    model(steps_ids[i:i + 1], inference_params=params, num_last_tokens=1)
                    params.seqlen_offset += 1
                    torch.cuda.synchronize()
        path = os.path.join(out_dir, f"trace-mamba_ssm-{shape}-decode-eager.json")
        prof.export_chrome_trace(path)
        tables.append(trace_table.analyse(path, "mamba_ssm_decode_step", f"mamba_ssm {shape} decode step (eager)"))
    with open(os.path.join(out_dir, "profile-mamba_ssm.md"), "a") as f:
        for t in tables:
            f.write(trace_table.markdown(t) + "\n")
    return [{k: t[k] for k in ("label", "wall_us_median", "gpu_busy_us_median", "kernels_per_instance",
                               "gpu_idle_fraction")} for t in tables]


# ------------------------------------------------------------ main

DEFAULT_SHAPES = {"mamba1": ["130m", "2.8b"], "mamba2": ["130m", "2.7b"]}


def model_dir(family, shape):
    """bench/peer/run_h200.sh's HF checkpoint directory, under --models."""
    return f"mamba-{shape}" if family == "mamba1" else f"mamba2-{shape}"


def tag(family, shape):
    """Names icd's logits files and the traces: the shape alone for mamba1 (as before)."""
    return shape if family == "mamba1" else f"mamba2-{shape}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", required=True)
    parser.add_argument("--family", choices=sorted(DEFAULT_SHAPES), default="mamba1")
    parser.add_argument("--shapes", nargs="+", help="default: 130m 2.8b (mamba1), 130m 2.7b (mamba2)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--build", default=os.path.join(PEERS, "build"))
    parser.add_argument("--icd-logits")
    parser.add_argument("--ids")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--prefill-iters", type=int, default=30)
    parser.add_argument("--decode-steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--hf-shapes", nargs="*", default=[],
                        help="shapes whose HF PyTorch-path float32 logits join the comparison")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    try:
        MambaConfig, MambaLMHeadModel, generation, info = import_mamba_ssm(
            args.build, need_mamba2=args.family == "mamba2")
    except Exception:  # noqa: BLE001  (a record says so, then the run fails)
        emit({"impl": "mamba_ssm", "family": args.family, "commit": args.commit, "bench": "peer_import",
              "error": traceback.format_exc()[-2000:]}, args.out)
        raise
    common = {"impl": "mamba_ssm", "family": args.family, "commit": args.commit,
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
              "mamba_ssm": info["version"]}
    emit(dict(common, bench="peer_import", **info), args.out)
    ids = None
    if args.ids:
        with open(args.ids) as f:
            ids = torch.tensor(json.load(f), dtype=torch.long, device="cuda").reshape(1, -1)

    for shape in args.shapes or DEFAULT_SHAPES[args.family]:
        label = tag(args.family, shape)
        hf_dir = os.path.join(args.models, model_dir(args.family, shape))
        ckpt = os.path.join(hf_dir, "mamba_ssm")
        # ---- logits: float32 first (bf16 random models are chaotic), then bf16
        if ids is not None:
            logits = {}
            for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                t0 = time.perf_counter()
                model = load_peer((MambaConfig, MambaLMHeadModel), ckpt, dtype)
                with torch.no_grad():
                    logits[f"mamba_ssm-{dtype_name}"] = model(ids).logits.float()
                try:
                    check = decode_matches_forward(model, generation, ids, dtype)
                    emit(dict(common, bench="peer_decode_vs_forward", shape=shape, dtype=dtype_name,
                              tokens=ids.shape[1], **check), args.out)
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                del model
                torch.cuda.empty_cache()
                if args.icd_logits:
                    path = os.path.join(args.icd_logits, f"icd-{label}-{dtype_name}.json")
                    if os.path.exists(path):
                        logits[f"icd-{dtype_name}"] = read_icd_logits(path).cuda()
                print(f"[peer] {label} {dtype_name} logits in {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr, flush=True)
            if shape in args.hf_shapes:
                try:
                    logits["hf-float32"], hf_path = hf_logits(hf_dir, ids, torch.float32)
                    emit(dict(common, bench="hf_forward", shape=shape, dtype="float32", **hf_path), args.out)
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
            pairs = [("icd-float32", "mamba_ssm-float32"), ("icd-float32", "hf-float32"),
                     ("mamba_ssm-float32", "hf-float32"), ("icd-bfloat16", "mamba_ssm-bfloat16"),
                     ("icd-bfloat16", "icd-float32"), ("mamba_ssm-bfloat16", "mamba_ssm-float32"),
                     ("icd-bfloat16", "mamba_ssm-float32")]
            for a, b in pairs:
                if a in logits and b in logits:
                    emit(dict(bench="logits_compare", family=args.family, shape=shape, a=a, reference=b,
                              tokens=ids.shape[1], commit=args.commit, **compare(logits[a], logits[b])),
                         args.out)
            del logits
            torch.cuda.empty_cache()

        if args.skip_timing:
            continue
        # ---- latency, bf16, batch 1
        dtype = torch.bfloat16
        model = load_peer((MambaConfig, MambaLMHeadModel), ckpt, dtype)
        gen = torch.Generator(device="cpu").manual_seed(11)
        vocab = model.config.vocab_size
        prompt = torch.randint(0, vocab, (1, args.seq_len), generator=gen).cuda()
        steps_ids = torch.randint(0, vocab, (args.warmup + args.decode_steps + 8, 1), generator=gen).cuda()
        shared = dict(common, shape=shape, dtype="bfloat16", batch=1, seq_len=args.seq_len,
                      method="cuda_events")
        t = time_prefill(model, prompt, args.warmup, args.prefill_iters)
        emit(dict(shared, bench="peer_latency", mode="prefill", cuda_graphs=False, **summarize(t)), args.out)
        for cg in (True, False):
            t, _ = time_decode(model, generation, prompt, steps_ids, args.warmup, args.decode_steps, cg, dtype)
            emit(dict(shared, bench="peer_latency", mode="decode", cuda_graphs=cg,
                      method_detail=("update_graph_cache + replay of the captured step (generate(cg=True))"
                                     if cg else "eager step through InferenceParams (generate(cg=False))"),
                      **summarize(t)), args.out)
        if not args.no_profile:
            try:
                summary = profile_peer(model, generation, prompt, steps_ids, dtype, args.out, label)
                emit(dict(common, bench="peer_profile", shape=shape, tables=summary), args.out)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
