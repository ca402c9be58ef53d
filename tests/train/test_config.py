"""The run's configuration as later commands read it (``run_config``, ``run_defaults``)."""

import yaml

from musicray.request import RunDefaults, request_from_fields
from musicray.run import RunDir
from musicray.train.config import run_config, run_defaults


def test_a_run_composes_as_its_evaluation_did(tmp_path):
    run = RunDir(tmp_path / "run")
    run.stage1_config.parent.mkdir(parents=True)
    run.stage1_config.write_text(yaml.safe_dump(
        {"eval": {"sampling": {"melody": {"temperature": 0.8}}, "variation": 0.4}}))
    assert run_config(run.root).eval.variation == 0.4
    defaults = run_defaults(run.root)
    assert defaults == RunDefaults({"melody": {"temperature": 0.8}}, 0.4)
    request = request_from_fields(form="A4", defaults=defaults)
    assert request.sampling_for("melody").temperature == 0.8 and request.sampling_for("chords").temperature == 1.0
    assert request.variation == 0.4


def test_a_run_without_a_config_has_no_defaults(tmp_path):
    assert run_defaults(tmp_path) == RunDefaults()
