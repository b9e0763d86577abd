"""A wheel carries the native kernels' sources, so an installed (not editable) package builds
the kernels rather than falling back to the plain-torch paths."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_kernel_source(tmp_path):
    build = ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)]
    subprocess.run([sys.executable, "-m", "pip", *build], check=True)
    (wheel,) = tmp_path.glob("vllm_compaction-*.whl")
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    # Imported from the unpacked wheel, away from the checkout, the kernel finds its sources.
    found = subprocess.run(
        [sys.executable, "-c", "from vllm_compaction.kernels import cpu; print(*cpu.SOURCES)"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(installed), "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    sources = [Path(path) for path in found]
    assert sources and all(path.is_relative_to(installed) for path in sources), found
    # Every source and header the build reads, as in the checkout.
    carried = {path.name: path.read_bytes() for path in sources[0].parent.iterdir()}
    checkout = {
        path.name: path.read_bytes()
        for path in (ROOT / "csrc").iterdir()
        if path.suffix in (".cpp", ".h")
    }
    assert carried == checkout
    assert {path.name for path in sources} <= set(checkout)


def test_each_source_folder_builds_in_its_own_folder(monkeypatch):
    # torch rebuilds a build folder whenever its sources' path changes: two checkouts (or a
    # checkout and a wheel) sharing a home must not take turns rebuilding one folder.
    from vllm_compaction.kernels import cpu

    here = cpu.build_dir()
    monkeypatch.setattr(cpu, "SOURCES", [Path("/elsewhere/csrc/biased_attention.cpp")])
    assert cpu.build_dir() != here
    assert cpu.build_dir().parent == here.parent
