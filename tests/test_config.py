"""Settings: the shipped conf/pkglayer.toml, TOML validation, command-line precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from pkglayer.cli import main
from pkglayer.config import BuildSettings, load_settings
from pkglayer.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_shipped_config_spells_out_the_builtin_defaults() -> None:
    shipped = load_settings(str(REPO / "conf/pkglayer.toml"))
    assert shipped == BuildSettings()


@pytest.mark.parametrize(
    "text, message",
    [
        ("[build]\ncompresion = 'gzip'\n", "unknown setting build.compresion"),
        ("[build]\nmax-layers = '10'\n", "build.max-layers must be a int"),
        ("[build]\nexcludes = [1]\n", "list of strings"),
        ("[build\n", "c.toml"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(str(conf))


@pytest.mark.parametrize("value", [0, 3, 128])
def test_layer_budget_is_bounded(value: int) -> None:
    with pytest.raises(ConfigError, match="max-layers"):
        BuildSettings(max_layers=value).validated()


def test_command_line_overrides_file(tmp_path: Path, capsys) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("[build]\ncompression = 'zstd'\nextra-excludes = ['srv/**']\n")
    root = tmp_path / "root"
    (root / "srv/data").mkdir(parents=True)
    (root / "srv/data/x").write_text("x")
    (root / "opt").mkdir()
    (root / "opt/y").write_text("y")
    assert main(["scan", str(root), "--config", str(conf), "--exclude", "opt/y", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"srv/data"' in out and '"opt/y"' in out
