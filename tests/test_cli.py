"""The ``sft-plugins`` command's host parts: ``--version`` and ``list``."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from sft_plugins import __version__
from sft_plugins.cli import main

ACME = {
    "acme_sft.py": """
        from sft_plugins import hookimpl

        class AcmeNoise:
            name = "acme-noise"
            aliases = ()
            description = "Noise from Acme.\\nSecond line."

        @hookimpl
        def register_perturbers(register):
            register(AcmeNoise)
    """,
}


def run_list(*args: str) -> dict:
    result = CliRunner().invoke(main, ["list", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_list_json_shape_and_third_party_entries(install):
    install("acme-sft", ACME, {"acme": "acme_sft"})
    listing = run_list()
    assert set(listing) == {"templates", "collators", "perturbers", "errors"}
    acme = [p for p in listing["perturbers"] if p["name"] == "acme-noise"]
    assert acme == [{"name": "acme-noise", "aliases": [], "plugin": "acme",
                     "description": "Noise from Acme."}]
    for kind in ("templates", "collators", "perturbers"):
        assert all({"name", "plugin"} <= set(entry) for entry in listing[kind])
    assert listing["errors"] == []


def test_list_without_disabled_plugin(install, monkeypatch):
    install("acme-sft", ACME, {"acme": "acme_sft"})
    monkeypatch.setenv("SFT_PLUGINS_DISABLE", "acme")
    assert not [p for p in run_list()["perturbers"] if p["plugin"] == "acme"]


def test_list_reports_broken_plugin_and_exits_zero(install):
    install("broken-sft", {"broken_sft.py": "raise ImportError('half-installed: acme[gpu]')\n"},
            {"broken": "broken_sft"})
    [error] = run_list()["errors"]
    assert error["plugin"] == "broken" and error["distribution"] == "broken-sft"
    assert "half-installed" in error["error"] and "SFT_PLUGINS_DISABLE=broken" in error["error"]
    table = CliRunner().invoke(main, ["list"])
    assert table.exit_code == 0 and "broken plugin" in table.output
    assert "half-installed: acme[gpu]" in table.output  # text, not markup


def test_python_dash_m_runs_the_same_command(install):
    install("acme-sft", ACME, {"acme": "acme_sft"})
    done = subprocess.run([sys.executable, "-m", "sft_plugins", "list", "--json"],
                          capture_output=True, text=True, check=True)
    assert any(p["name"] == "acme-noise" for p in json.loads(done.stdout)["perturbers"])
