"""Export profiles (export/*.yaml, ``hypermerge export --profile``): every shipped one loads, problems
are reported all at once, command-line options override the profile, the report records it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import hypermerge as hm
from hypermerge.cli import cli
from hypermerge.export.profiles import ExportProfile, load_profile, shipped_profiles
from tests.helpers.common import save_tiny

SHIPPED = ["ort-cpu-fp32", "ort-cpu-int4-decode", "ort-cpu-int8", "trt-bf16", "trt-fp16"]


def run(args):
    return CliRunner().invoke(cli, args)


def test_the_shipped_profiles_are_there():
    assert set(SHIPPED) <= set(shipped_profiles())


@pytest.mark.parametrize("name", sorted(shipped_profiles()))
def test_every_shipped_profile_loads(name):
    profile = load_profile(name)
    assert profile.description and profile.problems() == []
    assert load_profile(shipped_profiles()[name]) == profile  # by path too
    options = profile.export_options()
    assert "description" not in options and options["tolerance"].atol == profile.atol


def test_what_the_shipped_profiles_say():
    assert load_profile("ort-cpu-int4-decode").quantize == "int4"
    assert load_profile("ort-cpu-int8").quantize == "int8"
    assert load_profile("ort-cpu-fp32").quantize is None and load_profile("ort-cpu-fp32").provider == "cpu"
    assert load_profile("trt-fp16").trt and load_profile("trt-fp16").precision == "fp16"
    assert load_profile("trt-bf16").precision == "bf16"


def test_every_problem_is_named_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("quantise: int8\nprovider: gpu\nopset: 12\nthreads: two\nblock_size: 48\nshapes: 1x8:4x8:8x8\n")
    with pytest.raises(hm.ConfigError) as error:
        load_profile(path)
    message = str(error.value)
    for fragment in ("unknown key(s) quantise", "valid keys are description", "provider: 'gpu'", "opset: 12",
                     "threads: expected an integer or null, got 'two'", "block_size: 48", "set trt: true",
                     str(path)):
        assert fragment in message, (fragment, message)


def test_overrides_win_and_are_validated():
    profile = load_profile("ort-cpu-int4-decode", {"threads": 2, "block_size": 64, "quantize": None})
    assert (profile.threads, profile.block_size, profile.quantize, profile.provider) == (2, 64, None, "cpu")
    assert load_profile(None) == ExportProfile()
    with pytest.raises(hm.ConfigError, match="quantize: 'int3'"):
        load_profile("ort-cpu-fp32", {"quantize": "int3"})


def test_unknown_profile_and_missing_file(tmp_path):
    with pytest.raises(hm.ConfigError, match="no export profile named 'ort-tpu'.*ort-cpu-int8"):
        load_profile("ort-tpu")
    with pytest.raises(hm.ConfigError, match="export profile not found"):
        load_profile(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- provider: cpu\n")
    with pytest.raises(hm.ConfigError, match="must be a mapping"):
        load_profile(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("provider: [cpu\n")
    with pytest.raises(hm.ConfigError, match="not valid YAML"):
        load_profile(tmp_path / "broken.yaml")


def test_cli_profile_errors_are_one_line_and_write_nothing(tmp_path):
    source = save_tiny("bert", tmp_path / "source")
    (tmp_path / "p.yaml").write_text("quantize: int2\niters: 0\n")
    for args, fragments in ((["--profile", "ort-tpu"], ["no export profile named"]),
                            (["--profile", str(tmp_path / "p.yaml")], ["quantize: 'int2'", "iters: must be"]),
                            (["--profile", "ort-cpu-fp32", "--fp16"], ["set trt: true"])):
        result = run(["export", str(source), "--out", str(tmp_path / "o"), *args])
        lines = [line for line in result.output.strip().splitlines() if line]
        assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("hypermerge: error:"), result.output
        assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert not (tmp_path / "o").exists()


def test_cli_options_override_the_profile_and_the_report_records_it(tmp_path):
    source = save_tiny("bert", tmp_path / "source")
    (tmp_path / "mine.yaml").write_text("description: test\nprovider: cpu\niters: 50\nbatch: 2\nseq: 8\nthreads: 1\n")
    result = run(["export", str(source), "--out", str(tmp_path / "o"), "--profile", str(tmp_path / "mine.yaml"),
                  "--iters", "3", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["profile"]["name"] == str(tmp_path / "mine.yaml")
    assert report["profile"]["iters"] == 3 and report["profile"]["threads"] == 1  # the command line won
    assert report["latency"]["iterations"] == 3 and report["latency"]["batch"] == 2
    assert report["parity"]["passed"] and "- profile:" in (tmp_path / "o" / "report.md").read_text()
