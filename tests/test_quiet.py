"""The libraries' start-up noise is filtered unless --verbose; what musicray prints itself still shows."""

from __future__ import annotations

import io
import os

from musicray.quiet import QUIET, QUIET_ENVIRONMENT, is_quiet, quiet_libraries, silenced_stdout


def test_quiet_sets_the_environment_the_workers_inherit(monkeypatch):
    for key in QUIET_ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    quiet_libraries(verbose=True)
    assert not is_quiet() and "TRANSFORMERS_VERBOSITY" not in os.environ
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")      # a value the user set wins
    quiet_libraries()
    assert is_quiet() and os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


def test_silenced_stdout_only_when_quiet(monkeypatch, capsys):
    kept = io.StringIO()
    monkeypatch.setenv(QUIET, "1")
    with silenced_stdout():
        print("library chatter")
        print("our own line", file=kept)     # a stream kept from before still shows
    monkeypatch.delenv(QUIET)
    with silenced_stdout():
        print("verbose chatter")
    assert capsys.readouterr().out == "verbose chatter\n" and kept.getvalue() == "our own line\n"
