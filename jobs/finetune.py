"""Stage 1, the full fine-tune on Ray Train + DeepSpeed, as a Ray job: the options of `musicray train`.

    ray job submit --working-dir . -- python jobs/finetune.py --config configs/llama3_8b.yaml --out /data/runs/llama3
    python jobs/finetune.py --config configs/tiny.yaml --out runs/tiny [--resume] [--set stage1.max_steps=80]

On a running cluster it joins it; otherwise it starts a local Ray instance.
"""

import sys

from musicray.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
