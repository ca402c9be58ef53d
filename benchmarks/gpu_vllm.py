"""The vLLM engine against musicray's own loop on one GPU, with 1B- and 8B-shaped random-weight models (bf16) and
five random LoRA adapters: songs/s and decode tokens/s at 1, 8 and 32 concurrent songs, against the HBM-bandwidth
bound of a decode step (every weight read once per step: tokens/s <= batch x bandwidth / weight bytes).

Prepared for a lent GPU (the ``device`` tool) as one script meant to finish in under 8 minutes on an H100/H200:

    python benchmarks/gpu_vllm.py --shapes 1b 8b --out $OUT/gpu_vllm.json

In process, without Serve (the engine and the loop are what differ): vLLM is ``VllmStages`` (one engine, all five
adapters, the grammar as its logits processor), songs run as concurrent coroutines; the native loop is
``Composer.run_stages`` over the same songs as one batch. ``--shapes tiny --device cpu`` runs the same code on a
CPU (a dry run of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_speed import SIZES  # noqa: E402

from musicray.run import RunDir

# Memory bandwidth of the GPUs this is likely to meet (GB/s), for the bound.
HBM_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864}


def build_run(shape: str, root: Path, device: str, dtype, config=None, tokenizer_config=None,
              adapters: bool = True) -> Path:
    """A run dir: the random model of ``shape`` (``SIZES[shape]``, or ``config``, a ``TinyConfig``) with the music
    tokens, and five random LoRA adapters (q/v, r 16). The tokenizer is the tiny one's, or ``tokenizer_config``'s
    (e.g. the rehearsal's Llama 3 layout, whose 129,276 ids make the embedding and logits as wide as on Llama 3)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from musicray.model import MusicTokenizer, build_tokenizer, save_music_model
    from musicray.tokens import SUBTASKS, Vocabulary

    config = config or SIZES[shape]
    tokenizer = build_tokenizer(tokenizer_config or SIZES["tiny"])   # the tokenizer alone: no CPU model is built
    music = MusicTokenizer.extend(tokenizer, Vocabulary())
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # built in bf16 on the GPU: an 8B model is never held in fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                num_key_value_heads=config.num_key_value_heads, max_position_embeddings=16384, rope_theta=500000.0,
                rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=config.tie_word_embeddings))
    finally:
        torch.set_default_dtype(default)
    run = root / f"run-{shape}"
    save_music_model(model, music, RunDir(run).stage1_model)
    for k, task in enumerate(SUBTASKS if adapters else ()):
        torch.manual_seed(100 + k)
        adapted = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                                   init_lora_weights=False))
        adapted.save_pretrained(RunDir(run).adapter(task), save_embedding_layers=False)
        model = adapted.unload()
    del model
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    return run


def requests_for(count: int, form: str, first_seed: int):
    from musicray.compose import Request

    return [Request(form=form, seed=first_seed + k) for k in range(count)]


def measure_vllm(run: Path, levels: list[int], form: str, device: str, engine_args: dict, caps: dict) -> dict:
    from musicray.compose import Composer
    from musicray.engine.vllm_engine import VllmStages

    started = time.perf_counter()
    stages = VllmStages(run, tokens_per_bar=caps, device=device, engine_args=engine_args)
    result = {"startup_s": time.perf_counter() - started, "levels": {}}

    async def one(request) -> int:
        song = request.song()
        tokens = 0
        async for event in stages.compose(song, request, Composer.stages_for(request)):
            if event.kind == "stage_done":
                tokens += event.data["new_tokens"]
        return tokens

    async def levels_in_one_loop() -> None:   # AsyncLLM lives on one event loop: every level runs on it
        await asyncio.gather(*(one(r) for r in requests_for(2, form, 900)))   # warm-up
        for n in levels:
            tick = time.perf_counter()
            tokens = await asyncio.gather(*(one(r) for r in requests_for(n, form, 1000 * n)))
            wall = time.perf_counter() - tick
            result["levels"][n] = {"songs_per_s": n / wall, "tokens_per_s": sum(tokens) / wall, "wall_s": wall}
            print(f"  vllm @{n}: {n / wall:.2f} songs/s, {sum(tokens) / wall:.0f} tokens/s", flush=True)

    try:
        asyncio.run(levels_in_one_loop())
    finally:
        stages.shutdown()
    return result


def measure_native(run: Path, levels: list[int], form: str, device: str, caps: dict, dtype) -> dict:
    from musicray.compose import Composer

    started = time.perf_counter()
    composer = Composer(run, device, tokens_per_bar=caps, dtype=dtype)   # the dtype vLLM runs in: a fair race
    result = {"startup_s": time.perf_counter() - started, "levels": {}}
    requests = requests_for(2, form, 900)
    composer.run_stages([r.song() for r in requests], requests)   # warm-up
    for n in levels:
        requests = requests_for(n, form, 1000 * n)
        tick = time.perf_counter()
        done = composer.run_stages([r.song() for r in requests], requests)
        wall = time.perf_counter() - tick
        tokens = sum(info["new_tokens"] for c in done for info in c.stages.values())
        result["levels"][n] = {"songs_per_s": n / wall, "tokens_per_s": tokens / wall, "wall_s": wall}
        print(f"  native @{n}: {n / wall:.2f} songs/s, {tokens / wall:.0f} tokens/s", flush=True)
    del composer
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=list(SIZES))
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--form", default="A8B8")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                        help="of vLLM (the native loop's copy of the model shares the GPU after it)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    bandwidth = next((gbps for name, gbps in HBM_GBPS.items() if name in gpu), None)
    # Token caps as the tests use them: random weights otherwise fill the composer's caps.
    caps = {"chord": 6, "melody": 12, "secondary": 12}
    results = {"gpu": gpu, "bandwidth_gbps": bandwidth, "form": args.form, "shapes": {}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for shape in args.shapes:
            print(f"{shape}: building", flush=True)
            tick = time.perf_counter()
            run = build_run(shape, Path(tmp), args.device, dtype)
            weights = sum(f.stat().st_size for f in RunDir(run).stage1_model.glob("*.safetensors"))
            entry = {"build_s": time.perf_counter() - tick, "weight_bytes": weights}
            # Both engines in the same dtype (vLLM's "auto" could pick another than the native loop's).
            engine_args = {"dtype": str(dtype).removeprefix("torch."),
                           **({"gpu_memory_utilization": args.gpu_memory_utilization} if args.device == "cuda" else {})}
            entry["vllm"] = measure_vllm(run, args.levels, args.form, args.device, engine_args, caps)
            entry["native"] = measure_native(run, args.levels, args.form, args.device, caps, dtype)
            if bandwidth:   # a decode step reads every weight once: the bound of batch b is b x bandwidth / bytes
                entry["bound_tokens_per_s"] = {n: n * bandwidth * 1e9 / weights for n in args.levels}
            results["shapes"][shape] = entry
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
