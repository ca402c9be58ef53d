"""Prepare POP909 (or synthetic songs) as a Ray job.

    ray job submit --working-dir . -- python jobs/prepare_data.py --pop909 /data/pop909 --out /data/musicray/pop909
"""

import sys

from musicray.cli import main

sys.exit(main(["data", "prepare", *sys.argv[1:]]))
