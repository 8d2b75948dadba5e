"""Whole unmodified models: backend="flexattn" vs stock Inductor vs eager, in one run on one GPU.

GPT-2-like (12 layers, d=768, 12 heads) and Llama-like (8 layers, d=1024, 16 heads, 4 KV heads,
RoPE) built from transformers config classes with random weights and ``attn_implementation="eager"``
(the naive attention an unmodified model runs), bf16.  Per (model, sequence): median ms of a no-grad
forward and of a training step (forward + backward of the LM loss), peak memory of the training step,
and for flexattn the number of attention sites rewritten.

    python benchmarks/bench_models.py --models gpt2,llama --seqs 2048,8192 --out $OUT
    python benchmarks/bench_models.py --models llama --seqs 2048 --padded --out $OUT   # padded batches
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch


def build(name: str, seq: int):
    import transformers as tf

    if name == "gpt2":
        cfg = tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=max(seq, 1024), vocab_size=32000,
                            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        cfg._attn_implementation = "eager"
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=8, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=max(seq, 2048))
        cfg._attn_implementation = "eager"
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise ValueError(name)
    return model.to("cuda", torch.bfloat16)


def time_ms(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="gpt2,llama")
    p.add_argument("--seqs", default="2048,8192")
    p.add_argument("--backends", default="eager,inductor,flexattn")
    p.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seq")
    p.add_argument("--padded", action="store_true",
                   help="a new right-padding attention_mask (random lengths, at least half the sequence) on every "
                        "call, as a padded training loop passes: exercises the soft-mask path and the per-call "
                        "block sparsity of a changing mask (Note [changing mask tensors])")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = p.parse_args(argv)
    import transformers

    import attn_inductor  # noqa: F401

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "git_sha": os.environ.get("GIT_SHA", "?"), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    import triton

    env["triton"] = triton.__version__
    print(json.dumps(env), flush=True)
    rows = []
    for name in a.models.split(","):
        for seq in map(int, a.seqs.split(",")):
            batch = max(1, a.tokens // seq)
            for backend in a.backends.split(","):
                rec = dict(model=name, seq=seq, batch=batch, backend=backend)
                try:
                    torch._dynamo.reset()
                    torch._dynamo.utils.counters.clear()
                    torch.manual_seed(0)
                    model = build(name, seq)
                    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
                    run = model if backend == "eager" else torch.compile(
                        model, backend="flexattn" if backend == "flexattn" else "inductor", dynamic=False)

                    positions = torch.arange(seq, device="cuda")

                    def extra():
                        if not a.padded:
                            return {}
                        lengths = torch.randint(seq // 2, seq + 1, (batch, 1), device="cuda")
                        return {"attention_mask": (positions < lengths).long()}  # a new tensor, no host sync

                    def fwd():
                        with torch.no_grad():
                            return run(input_ids=ids, **extra()).logits

                    def train():
                        model.zero_grad(set_to_none=True)
                        out = run(input_ids=ids, labels=ids, **extra())
                        out.loss.backward()

                    t0 = time.time()
                    rec["fwd_ms"] = round(time_ms(fwd), 2)
                    rec["compile_fwd_s"] = round(time.time() - t0, 1)
                    train()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    train()
                    torch.cuda.synchronize()
                    rec["train_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                    rec["train_ms"] = round(time_ms(train), 2)
                    if backend == "flexattn":
                        c = torch._dynamo.utils.counters["attn_inductor"]
                        rec["rewritten"], rec["not_rewritten"] = int(c["rewritten"]), int(c["not_rewritten"])
                    rec["status"] = "ok"
                    del model, run
                except Exception as exc:  # noqa: BLE001
                    rec["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
                    traceback.print_exc(limit=2)
                torch.cuda.empty_cache()
                rows.append(rec)
                print(json.dumps(rec), flush=True)
    os.makedirs(a.out, exist_ok=True)
    tag = f"{a.models.replace(',', '_')}_{a.seqs.replace(',', '_')}" + ("_padded" if a.padded else "")
    with open(os.path.join(a.out, f"models_{tag}.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    lines = [f"GPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
             f"git {env['git_sha'][:10]}, bf16" + (", a new padding mask every call" if a.padded else ""), "",
             "| model | seq x batch | backend | forward ms | train step ms | train peak GiB | sites rewritten |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['seq']} x {r['batch']} | {r['backend']} | {r.get('fwd_ms', r['status'][:30])} "
                     f"| {r.get('train_ms', '-')} | {r.get('train_peak_gib', '-')} | {r.get('rewritten', '-')} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, f"models_{tag}.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
