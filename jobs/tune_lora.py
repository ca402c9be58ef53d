"""Stage 2 (one LoRA adapter per sub-task, all sweeps in one Ray Tune run) as a Ray job.

    ray job submit --working-dir . -- python jobs/tune_lora.py --config configs/tiny.yaml --out /data/runs/tiny
"""

import sys

from musicray.train.tune import main

sys.exit(main(sys.argv[1:]))
