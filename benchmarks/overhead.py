"""What CLEX costs over plain RoPE, measured side by side in one run (not a test).

1. The ODE alone: solving θ(t) from 1 to 16 at rotary dim 128 with gradients (forward + backward),
   ours (residual form, RK4 at the default step, fp64) against a plain torchdiffeq RK4 at the
   reference's step 0.01 on the reference's field, with the accuracy of each against an fp64
   solution at step 0.01.
2. The model: median forward time at 8·L tokens and median train-step time at L tokens
   (forward + backward + AdamW, CLEX with a random t' and extrapolated positions per step),
   CLEX against vanilla on the same weights, runs interleaved so drift hits both alike.

    python benchmarks/overhead.py                    # tiny model + ODE (a minute on 2 cores)
    python benchmarks/overhead.py --shape smollm2    # SmolLM2-135M's shape, L = 2048 (slow on CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch
import transformers as tf
from torchdiffeq import odeint

import clex
from clex.dynamics import CLEXDynamics

SHAPES = {
    # SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV heads, head_dim 64, rope_theta 1e5
    "smollm2": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=256, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=128,
    ),
}


def timed(fn, sync=lambda: None) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def bench_ode(repeats: int) -> dict:
    d, _h = 128, 64
    torch.manual_seed(0)
    dyn = CLEXDynamics(d, ode_base=10000.0)
    with torch.no_grad():
        dyn.down_proj.normal_(0, 0.02)
    log_theta = -(torch.arange(0, d, 2, dtype=torch.float64) / d) * math.log(10000.0)

    def ours():
        dyn.zero_grad()
        z = dyn.solve(log_theta, [16.0])
        z.exp().sum().backward()
        return z[0]

    index = torch.arange(0, d, 2, dtype=torch.float32)

    def reference_field(up, down, dtype):
        def field(t, x):
            a = torch.clamp(2 * t - 1, min=1.0)
            ntk = 1.0 / ((10000 * a ** (d / (d - 2))) ** (index.to(dtype) / d))
            i = index.to(dtype)
            delta = -2 * i / (d - 2) / (10000 ** (i / d) * a ** (i / (d - 2) + 1))
            return torch.tanh((x + torch.log(ntk)) @ up) @ down + delta / ntk

        return field

    def reference(dtype=torch.float32, grad=True):
        up = dyn.up_proj.detach().T.to(dtype).requires_grad_(grad)
        down = dyn.down_proj.detach().T.to(dtype).requires_grad_(grad)
        grid = torch.tensor([1.0, 16.0], dtype=dtype)
        sol = odeint(reference_field(up, down, dtype), log_theta.to(dtype), grid, method="rk4",
                     options={"step_size": 0.01})
        if grad:
            sol[-1].exp().sum().backward()
        return sol[-1]

    with torch.no_grad():
        exact = reference(torch.float64, grad=False).exp()
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t_ours.append(timed(ours))
        t_ref.append(timed(reference))
    with torch.no_grad():
        # as the rotary module does: exp in fp64, then fp32 (rounding log θ to fp32 first costs ~1e-6)
        err_ours = ((dyn.solve(log_theta, [16.0])[0].exp().float().double() - exact) / exact).abs().max().item()
        err_ref = ((reference(grad=False).double().exp() - exact) / exact).abs().max().item()
    return {
        "ode_ours_ms": 1e3 * statistics.median(t_ours),
        "ode_torchdiffeq_dt0.01_ms": 1e3 * statistics.median(t_ref),
        "ode_speedup": statistics.median(t_ref) / statistics.median(t_ours),
        "ode_ours_max_rel_err": err_ours,
        "ode_reference_fp32_max_rel_err": err_ref,
        "ode_time_dt": dyn.time_dt,
    }


def bench_model(shape: str, repeats: int, device: str, forward_factor: int, max_factor: int) -> dict:
    cfg = tf.LlamaConfig(**SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    L = cfg.max_position_embeddings
    torch.manual_seed(0)
    vanilla = tf.LlamaForCausalLM(cfg).to(device)
    ours = tf.LlamaForCausalLM(tf.LlamaConfig.from_dict(cfg.to_dict())).to(device)
    ours.load_state_dict(vanilla.state_dict())
    clex.apply(ours, "clex", max_factor=max_factor)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    on_gpu = device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)
    g = torch.Generator().manual_seed(0)
    long_ids = torch.randint(0, cfg.vocab_size, (1, forward_factor * L), generator=g).to(device)
    ids = torch.randint(0, cfg.vocab_size, (1, L), generator=g).to(device)
    mask = torch.ones_like(ids)
    opt = {m: torch.optim.AdamW(m.parameters(), lr=1e-6) for m in (vanilla, ours)}

    def forward(model):
        model.eval()
        with torch.no_grad(), autocast:
            model(long_ids, logits_to_keep=1)

    def train_step(model):
        model.train()
        if model is ours:
            t = clex.sample_scale_factor(max_factor, g)
            pos = clex.extrapolated_positions(L, t, g).to(device)[None]
        else:
            pos = torch.arange(L, device=device)[None]
        with autocast:
            loss = model(ids, position_ids=pos, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt[model].step()
        opt[model].zero_grad(set_to_none=True)

    for model in (vanilla, ours):  # warm-up
        forward(model)
        train_step(model)
    times = {k: [] for k in ("fwd_vanilla", "fwd_clex", "step_vanilla", "step_clex")}
    for _ in range(repeats):
        times["fwd_vanilla"].append(timed(lambda: forward(vanilla), sync))
        times["fwd_clex"].append(timed(lambda: forward(ours), sync))
        times["step_vanilla"].append(timed(lambda: train_step(vanilla), sync))
        times["step_clex"].append(timed(lambda: train_step(ours), sync))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": shape, "L": L, "forward_tokens": forward_factor * L, "repeats": repeats, "device": device,
        "forward_vanilla_s": med["fwd_vanilla"], "forward_clex_s": med["fwd_clex"],
        "forward_ratio": med["fwd_clex"] / med["fwd_vanilla"],
        "train_step_vanilla_s": med["step_vanilla"], "train_step_clex_s": med["step_clex"],
        "train_step_ratio": med["step_clex"] / med["step_vanilla"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[*SHAPES, "all", "none"], default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ode-repeats", type=int, default=20)
    parser.add_argument("--forward-factor", type=int, default=8, help="forward length as a multiple of L")
    parser.add_argument("--max-factor", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ode = bench_ode(args.ode_repeats)  # one thread: the ODE is a chain of tiny mat-vecs
    torch.set_num_threads(threads)
    print(json.dumps(ode))
    print(f"ODE 1→16, dim 128, fwd+bwd, 1 thread: ours {ode['ode_ours_ms']:.1f} ms (step {ode['ode_time_dt']}, "
          f"rel err {ode['ode_ours_max_rel_err']:.1e}) vs torchdiffeq RK4 dt=0.01 "
          f"{ode['ode_torchdiffeq_dt0.01_ms']:.0f} ms (fp32 rel err {ode['ode_reference_fp32_max_rel_err']:.1e}): "
          f"{ode['ode_speedup']:.0f}× faster")
    shapes = [] if args.shape == "none" else (list(SHAPES) if args.shape == "all" else [args.shape])
    for shape in shapes:
        res = bench_model(shape, args.repeats, args.device, args.forward_factor, args.max_factor)
        print(json.dumps(res))
        print(f"{shape}: forward at {res['forward_tokens']} tokens CLEX/vanilla = {res['forward_ratio']:.3f} "
              f"({res['forward_clex_s']:.3f} s / {res['forward_vanilla_s']:.3f} s); train step at {res['L']} "
              f"tokens = {res['train_step_ratio']:.3f} ({res['train_step_clex_s']:.3f} s / "
              f"{res['train_step_vanilla_s']:.3f} s); medians of {res['repeats']}")


if __name__ == "__main__":
    main()
