"""The command line: help for every command, configs from YAML + flags, clear errors for bad values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from muvla.cli import COMMANDS, main
from muvla.utils.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command.name in text
    assert "report" in text and "table" in text


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_each_command_has_help_with_config_flags(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text and "--set" in text


def test_bad_value_is_a_clear_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["regions", "--out", str(tmp_path / "r"), "--backend", "yolo"])
    assert code == 2
    err = capsys.readouterr().err
    assert "backend" in err and "Traceback" not in err


def test_missing_required_value_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["retrieve", "--k", "5"])
    assert code == 2
    assert "--out" in capsys.readouterr().err


def test_yaml_config_then_flags_override(tmp_path: Path) -> None:
    from muvla.regions.stage import RegionsConfig

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"out": "o", "images": str(tmp_path), "max_regions": 3, "nms_iou": 0.3}))
    cfg = load_config(RegionsConfig, path, {"max_regions": 7, "batch_size": None})
    assert cfg.max_regions == 7 and cfg.nms_iou == 0.3 and cfg.batch_size == 32


def test_unknown_yaml_key_is_rejected(tmp_path: Path) -> None:
    from muvla.regions.stage import RegionsConfig

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"out": "o", "images": str(tmp_path), "max_regionz": 3}))
    with pytest.raises(ConfigError, match="max_regionz"):
        load_config(RegionsConfig, path)


def test_dotted_set_reaches_nested_stage_sections() -> None:
    from muvla.corpus.build import CorpusConfig

    cfg = load_config(CorpusConfig, None, {"out": "o", "text.corpus": [__file__], "regions.images": ".",
                                            "regions.max_regions": 10})
    assert cfg.regions.max_regions == 10 and cfg.text.corpus == [Path(__file__)]


def test_module_entry_point_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "muvla", "--version"], capture_output=True, text=True,
                            cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("muvla ")


def test_every_flag_has_help_and_choices_are_listed(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    from muvla.cli import config_flags

    for command in COMMANDS:
        config_cls = getattr(importlib.import_module(command.module), command.config_class)
        for flag in config_flags(config_cls):
            assert flag.help.strip(), f"muvla {command.name} {flag.flag} has no help text"
    with pytest.raises(SystemExit):
        main(["retrieve", "--help"])
    text = capsys.readouterr().out
    assert "official|counted" in text and "--set k=5" in text


def test_misspelt_flag_shows_the_command_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["retrieve", "--kk", "5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: muvla retrieve") and "--kk" in err


def test_a_setting_given_twice_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["corpus", "--images", str(tmp_path), "--corpus", __file__, "--out", str(tmp_path / "o"),
                 "--k", "5", "--set", "retrieval.k=10"])
    assert code == 2
    assert "retrieval.k is given twice: --k 5 and --set retrieval.k=10" in capsys.readouterr().err


def test_malformed_yaml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("k: 5\n  query_mode: counted\n", encoding="utf-8")
    code = main(["retrieve", "--config", str(bad), "--out", "o", "--regions", "r", "--text", "t"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:2:" in err and "invalid YAML" in err


def test_a_non_json_captions_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from muvla.corpus.region_store import ImageRegions
    from muvla.corpus.synthetic import write_region_store

    store = write_region_store(tmp_path / "regions", [ImageRegions(
        "a", "a.jpg", 10, 10, np.array([[0, 0, 5, 5]], np.float32), ["dog"], np.ones(1, np.float32),
        np.zeros(1, np.int32), np.zeros((1, 1280), np.float16))])
    bad = tmp_path / "captions.json"
    bad.write_text("{not json", encoding="utf-8")
    code = main(["evaluate", "--task", "retrieval", "--captions", str(bad), "--regions", str(store),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "JSON" in err


def test_every_command_prints_a_short_ending() -> None:
    """Each command names a describe function that exists (else the user sees raw key: value lines)."""
    import importlib

    from muvla.cli import COMMANDS

    for command in COMMANDS:
        assert command.describe_function, command.name
        assert callable(getattr(importlib.import_module(command.module), command.describe_function, None)), command.name
