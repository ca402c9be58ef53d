"""The whole pipeline (data -> stage 1 -> LoRA sweeps -> songs) as a Ray job: the options of `musicray pipeline`.

    ray job submit --working-dir . -- python jobs/pipeline.py --preset pop909-tiny --out /data/runs/pop909-tiny
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/llama3_8b.yaml --out /data/runs/llama3-8b

Under `ray job submit` the driver joins the job's cluster (ray.init finds it through RAY_ADDRESS); run directly, it
starts a local Ray instance. --out must then be absolute, on storage every node sees: a relative path would land in
the job's temporary copy of the repository, on the head node only (`musicray pipeline` refuses it there).
"""

import sys

from musicray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
