"""The whole pipeline (data -> stage 1 -> LoRA sweeps -> songs) as a Ray job: the options of `musicray pipeline`.

    ray job submit --working-dir . -- python jobs/pipeline.py --preset pop909-tiny --out /data/runs/pop909-tiny
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/llama3_8b.yaml --out /data/runs/llama3-8b

Under `ray job submit` the driver joins the job's cluster (ray.init finds it through RAY_ADDRESS); run directly, it
starts a local Ray instance. --out must then be absolute, on storage every node sees: a relative path would land in
the job's temporary copy of the repository, on the head node only.
"""

import os
import sys
from pathlib import Path

from musicray.cli import build_parser, report_errors
from musicray.song import SongError

# Set by Ray's job supervisor for every job driver (it carries the job's runtime_env).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(["pipeline", *(sys.argv[1:] if argv is None else argv)])

    def run(args) -> None:
        if os.environ.get(RAY_JOB_ENV) and not Path(args.out).expanduser().is_absolute():
            raise SongError(f"--out {args.out}: under `ray job submit` give an absolute path on storage every node "
                            "sees (a relative one lands in the job's temporary copy of the repository)")
        args.handler(args)

    return report_errors(run, args)


if __name__ == "__main__":
    sys.exit(main())
