"""Stage 2 (one LoRA adapter per sub-task, all sweeps in one Ray Tune run) as a Ray job: the options of
`musicray tune`.

    ray job submit --working-dir . -- python jobs/tune_lora.py --config configs/tiny.yaml --out /data/runs/tiny
"""

import sys

from musicray.cli import main

sys.exit(main(["tune", *sys.argv[1:]]))
