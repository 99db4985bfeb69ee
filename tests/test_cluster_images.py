"""The worker and manager Dockerfiles, checked without a docker daemon.

No image is built here: the development machines reach no container registry, so no base image
can be pulled (docs/cluster.md). These checks catch what breaks a build or a pod before CI does:
an unknown instruction, a COPY source that does not exist in the build context, an extra that
pyproject.toml does not declare, an entrypoint that is not executable-form, a shell script that
does not parse, a worker or manager flag the CLI does not have.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DOCKER = ROOT / "docker"
IMAGES = ["Dockerfile.worker", "Dockerfile.worker-cpu", "Dockerfile.cluster"]
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, `\\` continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued RUN is dropped by docker too
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: the last line continues with a backslash"
    return out


def _extras() -> set[str]:
    """The extras pyproject.toml declares (no tomllib on Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([a-z][a-z0-9_-]*)\s*=", section, flags=re.M))


def test_instruction_parser_catches_what_docker_rejects(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM x\nRUNN echo hi\n")
    assert [w for w, _ in instructions(bad)] == ["FROM", "RUNN"]  # RUNN is not an instruction
    bad.write_text("FROM x\nRUN echo \\\n")
    with pytest.raises(AssertionError, match="continues"):
        instructions(bad)


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_parses_and_every_copy_source_is_in_the_build_context(name):
    steps = instructions(DOCKER / name)
    words = [w for w, _ in steps]
    assert words[0] in ("FROM", "ARG") and "FROM" in words
    assert set(words) <= INSTRUCTIONS, set(words) - INSTRUCTIONS
    assert words.count("ENTRYPOINT") == 1
    for word, rest in steps:
        if word == "COPY":
            *sources, _dest = shlex.split(rest)
            sources = [s for s in sources if not s.startswith("--")]
            assert sources
            for src in sources:  # the build context is the repository root
                assert (ROOT / src).exists(), f"{name}: COPY {src}: not in the repository"
        if word == "ENTRYPOINT":
            argv = json.loads(rest)  # exec form: the worker is tini's child and gets SIGTERM
            assert argv[:2] == ["/usr/bin/tini", "--"] and argv[2] == "/usr/local/bin/ow-entrypoint"
        if word == "RUN" and "pip install" in rest:
            declared = _extras()
            for extras in re.findall(r'"/src\[([^\]]+)\]"', rest):
                for extra in extras.split(","):
                    assert extra in declared, f"{name}: extra [{extra}] not in pyproject.toml"
    copies = {shlex.split(r)[-1]: shlex.split(r)[0] for w, r in steps if w == "COPY"}
    script = copies["/usr/local/bin/ow-entrypoint"]
    assert (ROOT / script).exists()
    assert any(w == "RUN" and "chmod +x /usr/local/bin/ow-entrypoint" in r for w, r in steps)
    if name != "Dockerfile.cluster":
        assert script == "docker/entrypoint-worker.sh"
        assert ("WORKDIR", "/workspace") in steps


def test_gpu_image_carries_the_gpu_stack_and_the_cpu_image_does_not():
    gpu = " ".join(r for w, r in instructions(DOCKER / "Dockerfile.worker") if w in ("RUN", "FROM"))
    cpu = " ".join(
        r for w, r in instructions(DOCKER / "Dockerfile.worker-cpu") if w in ("RUN", "FROM")
    )
    assert "nvidia/cuda" in gpu and "vllm==" in gpu and "unsloth" in gpu and "inspect-ai" in gpu
    assert "nvidia/cuda" not in cpu and "vllm" not in cpu and "download.pytorch.org/whl/cpu" in cpu


@pytest.mark.parametrize("script", ["entrypoint-worker.sh", "entrypoint-cluster.sh"])
def test_entrypoint_scripts_parse_and_use_flags_the_cli_has(script):
    path = DOCKER / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    if script == "entrypoint-worker.sh":
        helptext = subprocess.run(
            [sys.executable, "-m", "openweights.worker", "--help"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
        used = set(re.findall(r"(--[a-z][a-z-]+)", text))
        assert used == {"--provider", "--name", "--docker-image"}
    else:
        helptext = subprocess.run(
            [sys.executable, "-m", "openweights.cli.main", "cluster", "--help"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
        used = set(re.findall(r"(--[a-z][a-z-]+)", text))
        assert used == {"--provider"} and "exec ow cluster" in text
    for flag in used:
        assert flag in helptext, f"{script} passes {flag}, which the CLI does not have"
