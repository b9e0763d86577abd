"""Wheels carry csrc/ as vllm_compaction/kernels/csrc/, where the native CPU kernel is built
from on first use (an editable install reads csrc/ in place)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernelSources(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "vllm_compaction" / "kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in Path(__file__).parent.joinpath("csrc").iterdir():
            if source.suffix in (".cpp", ".h"):
                shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithKernelSources})
