"""Start-up noise of the libraries musicray drives, filtered to the warnings that matter.

Set as environment variables before torch, transformers, DeepSpeed or Ray load, so that the Ray workers a command
starts (which inherit the environment) are as quiet as its own process. Errors, musicray's own progress and the
warnings that say something is wrong with the run still show; with ``--verbose`` nothing is filtered.
"""

from __future__ import annotations

import os
import warnings

QUIET = "MUSICRAY_QUIET"
QUIET_ENVIRONMENT = {
    QUIET: "1",    # read by musicray's own code where a library prints with print() (is_quiet)
    # transformers' info messages (e.g. how new embedding rows are initialised) and its per-load progress bars
    # ("Loading weights", "Writing model shards") for every model load and save.
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # Deprecation notices of the libraries' own use of torch and of one another: nothing a user can act on.
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    # Ray Tune's note on every experiment snapshot of short trials; and Ray's hint on how to silence its logs.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_DEDUP_LOGS_ALLOW_REGEX": "",
    # The tokenizers library's warning about forking after use (Ray starts workers by fork + exec).
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_libraries(verbose: bool = False) -> None:
    """Make the libraries quiet unless ``verbose`` (values already in the environment win)."""
    if verbose:
        return
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def is_quiet() -> bool:
    """Whether the command runs without --verbose (here or in a Ray worker it started)."""
    return os.environ.get(QUIET) == "1"


def silenced_stdout(stderr: bool = False):
    """A context that swallows what a library prints to stdout (and with ``stderr``, its progress bars there),
    when quiet; nothing otherwise. Output written to a stream kept from before (``sys.stdout`` saved earlier)
    still shows."""
    import contextlib
    import io

    if not is_quiet():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    if stderr:
        stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack
