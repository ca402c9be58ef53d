"""The rehearsal preset at Llama-3.1-8B width on one GPU, bf16 (issue 19 §3): decode tokens/s of both engines
against the HBM bound, and stage 1's step time and MFU. Prepared for a lent H100/H200: one command, under 8 minutes.

    python benchmarks/gpu_rehearsal.py --out $OUT/gpu_rehearsal.json

The model: the rehearsal's Llama 3 tokenizer layout (128,256 ids, the 1,020 music tokens after them) on
Llama-3.1-8B's shape (hidden 4096, intermediate 14,336, 32 heads / 8 key-value heads, llama3 rope scaling,
untied embeddings), random bf16 weights built on the GPU.

- Decode (``--layers``, default 32: the whole 8B, 16 GB of bf16 weights): the vLLM engine (one engine, five random
  LoRA adapters, the grammar as its logits processor) and musicray's own loop in the same dtype, at 1, 8 and 32
  concurrent songs (``benchmarks/gpu_vllm.py``'s measurements), against the HBM bound of a decode step (every
  weight read once per step: tokens/s <= batch x bandwidth / weight bytes).
- Stage 1 (``--train-layers``, default 8): the stage-1 worker's path on one rank (configs/rehearsal.yaml with
  bf16 on the GPU, ``deepspeed_config``, ZeRO-3 loading inside ``zero.Init``, ``prepare_for_training``, DeepSpeed's
  engine, the causal-LM loss) on ``--seq``-token rows of random music tokens: seconds per optimizer step and MFU
  (model FLOPs 6N + 12 x layers x hidden x seq per token, N without the input embedding, whose lookup does no
  arithmetic; recomputation under gradient checkpointing not counted), against the GPU's dense bf16 peak. Fewer
  layers than 32 because full fine-tuning keeps 16 bytes per parameter (bf16 weights and gradients, fp32 AdamW
  master weights and moments): the whole 8B needs 128 GB, more than one GPU has; 8 layers (2.8 B parameters,
  45 GB) fit an 80 GB H100 with the activations of a 4,096-token row under gradient checkpointing.

Without CUDA it stops at once with a message (the decode and training measurements need a GPU); the formulas and
the arguments are tested on the CPU in tests/benchmarks/test_gpu_rehearsal.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_vllm import HBM_GBPS, build_run, measure_native, measure_vllm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 peak (TFLOP/s, without sparsity) of the GPUs this may meet, for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
# Llama-3.1-8B's shape and rope scaling on the rehearsal's Llama 3 vocabulary layout (musicray.model.REHEARSAL).
LLAMA31_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "tie_word_embeddings": False, "max_position_embeddings": 131072,
              "rope_scaling": (("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
                               ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192))}


def hbm_bound_tokens_per_s(batch: int, bandwidth_gbps: float, weight_bytes: int) -> float:
    """Most decode tokens/s a memory-bound step allows: each step reads every weight once and yields one token per
    sequence of the batch (the KV cache's reads are left out: small beside 16 GB at these lengths)."""
    return batch * bandwidth_gbps * 1e9 / weight_bytes


def train_flops_per_token(params: int, embedding_params: int, layers: int, hidden: int, seq: int) -> float:
    """Model FLOPs of one trained token (forward and backward; PaLM's appendix B): 6 per parameter that multiplies
    (the input embedding is a lookup) plus attention's 12 x layers x hidden x seq."""
    return 6 * (params - embedding_params) + 12 * layers * hidden * seq


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: the model FLOPs done per second over the GPU's peak."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def lookup(table: dict, gpu: str):
    """The value of the first GPU family in ``table`` whose name is in the device name (None if none)."""
    return next((value for name, value in table.items() if name in gpu), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
        return value

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=positive, default=32, help="decoder layers of the decode model (32: 8B)")
    parser.add_argument("--train-layers", type=positive, default=8,
                        help="decoder layers of the stage-1 model (the whole 8B does not fit one GPU's memory)")
    parser.add_argument("--seq", type=positive, default=4096, help="tokens per stage-1 row")
    parser.add_argument("--steps", type=positive, default=6, help="stage-1 steps timed (after one warm-up step)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="keep every layer's activations in stage 1 (stage1.gradient_checkpointing off)")
    parser.add_argument("--levels", type=positive, nargs="+", default=[1, 8, 32], help="concurrent songs")
    parser.add_argument("--form", default="A8B8", help="the songs' form")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                        help="of vLLM (the native loop's copy of the model shares the GPU after it)")
    parser.add_argument("--skip", choices=["decode", "train"], action="append", default=[],
                        help="leave a part out (to rerun the other one)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def shape(layers: int):
    from musicray.model import REHEARSAL

    return dataclasses.replace(REHEARSAL, **{**LLAMA31_8B, "num_hidden_layers": layers})


def measure_decode(args, tmp: Path, dtype, gpu: str) -> dict:
    from musicray.model import REHEARSAL
    from musicray.run import RunDir

    tick = time.perf_counter()
    run = build_run("8b", tmp, "cuda", dtype, config=shape(args.layers), tokenizer_config=REHEARSAL)
    weights = sum(f.stat().st_size for f in RunDir(run).stage1_model.glob("*.safetensors"))
    entry = {"layers": args.layers, "build_s": time.perf_counter() - tick, "weight_bytes": weights}
    print(f"decode model: {args.layers} layers, {weights / 1e9:.1f} GB, built in {entry['build_s']:.0f} s", flush=True)
    caps = {"chord": 6, "melody": 12, "secondary": 12}   # random weights would otherwise fill the composer's caps
    engine_args = {"dtype": str(dtype).removeprefix("torch."), "gpu_memory_utilization": args.gpu_memory_utilization}
    entry["vllm"] = measure_vllm(run, args.levels, args.form, "cuda", engine_args, caps)
    entry["native"] = measure_native(run, args.levels, args.form, "cuda", caps, dtype)
    bandwidth = lookup(HBM_GBPS, gpu)
    if bandwidth:
        entry["bound_tokens_per_s"] = {n: hbm_bound_tokens_per_s(n, bandwidth, weights) for n in args.levels}
        for engine in ("vllm", "native"):
            entry[engine]["of_bound"] = {n: level["tokens_per_s"] / entry["bound_tokens_per_s"][n]
                                         for n, level in entry[engine]["levels"].items()}
    return entry


def measure_stage1(args, tmp: Path, dtype, gpu: str) -> dict:
    """Stage 1's worker path on one rank: the loaded model, DeepSpeed's engine, timed optimizer steps."""
    import deepspeed
    import torch

    from musicray.model import REHEARSAL, load_music_model, prepare_for_training
    from musicray.train.config import load_config
    from musicray.train.deepspeed_config import deepspeed_config
    from musicray.train.loss import causal_lm_loss
    from musicray.train.stage1_models import torch_dtype, zero3_loading

    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531", "RANK": "0", "WORLD_SIZE": "1",
                        "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(name, value)
    tick = time.perf_counter()
    run = build_run("8b", tmp / "train", "cuda", dtype, config=shape(args.train_layers), tokenizer_config=REHEARSAL,
                    adapters=False)
    build_s = time.perf_counter() - tick
    config = load_config(ROOT / "configs" / "rehearsal.yaml", [
        "stage1.use_gpu=true", "stage1.precision=bf16", "stage1.num_workers=1", "stage1.micro_batch_size=1",
        f"stage1.max_steps={args.steps + 1}", f"stage1.gradient_checkpointing={str(args.gradient_checkpointing).lower()}"])
    ds_config = deepspeed_config(config)
    deepspeed.init_distributed(dist_backend="nccl")
    torch.cuda.set_device(0)
    torch.cuda.reset_peak_memory_stats()
    hf_deepspeed = zero3_loading(ds_config)   # transformers reads it while the model lives
    from musicray.run import RunDir

    model, music = load_music_model(RunDir(run).stage1_model, torch_dtype(config.stage1.precision))
    prepare_for_training(model, config.stage1.gradient_checkpointing)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad], config=ds_config)
    engine.train()   # from_pretrained returns eval mode, where Hugging Face skips gradient checkpointing
    params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    embedding = engine.module.get_input_embeddings().weight
    embedding_params = getattr(embedding, "ds_numel", embedding.numel())
    generator = torch.Generator().manual_seed(0)
    step_s = []
    for step in range(args.steps + 1):
        ids = (music.offset + torch.randint(0, len(music.vocab), (1, args.seq), generator=generator)).cuda()
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss = causal_lm_loss(engine(input_ids=ids).logits, ids)
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        if step:   # the first step allocates and warms up
            step_s.append(time.perf_counter() - started)
        print(f"  stage 1 step {step}: {time.perf_counter() - started:.2f} s, loss {loss.item():.3f}", flush=True)
    median = statistics.median(step_s)
    flops = train_flops_per_token(params, embedding_params, args.train_layers, LLAMA31_8B["hidden_size"], args.seq)
    peak = lookup(PEAK_BF16_TFLOPS, gpu)
    entry = {"layers": args.train_layers, "params": params, "seq": args.seq, "build_s": build_s,
             "gradient_checkpointing": args.gradient_checkpointing, "zero_stage": ds_config["zero_optimization"]["stage"],
             "step_s_median": median, "step_s_min": min(step_s), "step_s_max": max(step_s),
             "tokens_per_s": args.seq / median, "flops_per_token": flops,
             "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
             "mfu": mfu(args.seq / median, flops, peak) if peak else None}
    del engine, model, hf_deepspeed
    gc.collect()
    torch.cuda.empty_cache()
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_rehearsal: no CUDA device: this script measures a GPU (bf16 decode against the HBM bound, stage-1 "
              "MFU) and runs only where one is lent; nothing was run", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    dtype = torch.bfloat16
    results = {"gpu": gpu, "bandwidth_gbps": lookup(HBM_GBPS, gpu), "peak_bf16_tflops": lookup(PEAK_BF16_TFLOPS, gpu),
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        # Training first: the decode part's two engines leave the GPU's memory fragmented.
        if "train" not in args.skip:
            results["stage1"] = measure_stage1(args, Path(tmp), dtype, gpu)
            print(json.dumps(results["stage1"]), flush=True)
        if "decode" not in args.skip:
            results["decode"] = measure_decode(args, Path(tmp), dtype, gpu)
    results["wall_s"] = time.perf_counter() - started
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
