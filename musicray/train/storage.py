"""Where Ray Train (stage 1) and Ray Tune (stage 2) keep their checkpoints and experiment state: the one owner of
``RunConfig(storage_path=..., storage_filesystem=...)`` for both stages.

``ray_storage: null`` (the default) keeps them in ``RUN/ray`` (``RunDir.ray``): a local disk on one machine, or a
shared filesystem (NFS, EFS, ...) when RUN is on one, as every node then sees the same path. A URI that pyarrow's
filesystems read (``s3://bucket/prefix``, ``gs://...``, ``abfs://...``, or a plain directory) keeps them there
instead, so the nodes of a cloud cluster need no shared filesystem for checkpoints: each run gets the folder
``<ray_storage>/<the run dir's absolute path>/`` (a re-run into the same ``--out`` finds its own checkpoints, and the
pipeline's ablations, run dirs of their own, never share one). Filesystem options go in the URI's query, e.g.
``s3://bucket/musicray?endpoint_override=http://minio:9000&region=us-east-1`` for an S3-compatible server;
credentials come from the usual places (AWS_* variables, ~/.aws, an instance profile).

The URI is resolved once on the driver (``pyarrow.fs.FileSystem.from_uri``) and the filesystem object travels with
the run config to the Ray Train controller, its workers and the Tune trials, as Ray Train does for a
``storage_filesystem`` of its own. The models the rest of the pipeline reads (``stage1/init``, ``stage1/model``,
``adapters/``) stay in RUN.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from musicray.errors import SongError
from musicray.run import RunDir
from musicray.train.config import Config

FIELD = "ray_storage"


@dataclass(frozen=True)
class RayStorage:
    """The storage of one run dir's Ray experiments (``stage1``, ``stage2``): ``filesystem`` (None: pyarrow resolves
    the local ``path``, as Ray does for a plain ``storage_path``) and ``path`` on it; ``uri`` for messages."""

    filesystem: object | None
    path: str
    uri: str

    def run_config(self) -> dict:
        """The ``RunConfig`` keywords of Ray Train and Ray Tune."""
        return {"storage_path": self.path, "storage_filesystem": self.filesystem}

    def location(self, experiment: str) -> str:
        """Where ``experiment`` lives, as the user wrote it (a path, or a URI with the run's folder)."""
        return f"{self.uri.rstrip('/')}/{experiment}"

    def remove(self, experiment: str) -> None:
        """Delete ``experiment`` (an unfinished run started again from scratch); nothing if it does not exist."""
        import pyarrow.fs as pafs

        filesystem, root = self._resolved(experiment)
        if filesystem.get_file_info(root).type == pafs.FileType.Directory:
            filesystem.delete_dir(root)

    def _resolved(self, experiment: str):
        import pyarrow.fs as pafs

        filesystem = self.filesystem or pafs.LocalFileSystem()
        return filesystem, f"{self.path.rstrip('/')}/{experiment}"


def ray_storage(config: Config, run: RunDir) -> RayStorage:
    """The Ray experiment storage of ``run`` under ``config.ray_storage`` (``RUN/ray`` when it is null)."""
    uri = config.ray_storage
    if uri is None:
        return RayStorage(None, str(run.ray), str(run.ray))
    import pyarrow.fs as pafs

    target = uri if "://" in uri else str(Path(uri).expanduser().resolve())
    base = target.split("?", 1)[0].rstrip("/")
    try:
        filesystem, path = pafs.FileSystem.from_uri(target)
    except (ValueError, OSError) as error:     # pyarrow's ArrowInvalid is a ValueError
        raise SongError(f"{FIELD}: {uri!r} cannot be opened ({error}); expected a directory or a URI such as "
                        "s3://bucket/prefix") from None
    if not path.strip("/"):
        raise SongError(f"{FIELD}: {uri!r} names no bucket or folder; expected e.g. s3://bucket/prefix")
    # The run dir's absolute path below the prefix: one folder per run dir, found again by a re-run into it.
    below = run.root.as_posix().lstrip("/")
    return RayStorage(filesystem, f"{path.rstrip('/')}/{below}", f"{base}/{below}")
