"""docker-compose.yml, the Dockerfile and .dockerignore, checked where no Docker engine runs.

- The compose tool validates the file when one is installed (``docker-compose config``, v1 or
  v2, or the ``docker compose`` plugin; CI: the Debian package ``docker-compose``).
- The YAML is parsed (PyYAML from this interpreter, else from a system ``python3`` that has it:
  ``python3-yaml`` comes with Debian's docker-compose) and the mesh asserted: ``lan1`` and
  ``lan2`` are internal and share only the relay; one relay, one seed, peers on both LANs; every
  service runs ``scripts/mesh-node.sh`` and is health-checked with ``eidetica-node health``;
  the arguments handed to ``eidetica-node run`` are ones the real CLI accepts.
- The Dockerfile's instructions are read as text: its base, user, volume, ports, health check,
  entrypoint and command (parsed by the real CLI), and every file it copies is in the context
  that .dockerignore lets through.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from node.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
MESH_NODE = REPO / "scripts" / "mesh-node.sh"
TOOL_TIMEOUT_S = 60
YAML_TO_JSON = "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)"
ROLES = ("relay", "seed", "peer")


# ---- helpers ----------------------------------------------------------------------------------


def _compose_tool() -> list[str] | None:
    """``docker-compose`` (v1 or v2 standalone) or ``docker compose`` (the v2 plugin), if present."""
    candidates = []
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for argv in candidates:
        try:
            done = subprocess.run([*argv, "version"], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return argv
    return None


def _yaml_to_data(text_path: Path) -> Any:
    """The YAML file as Python data, with whichever PyYAML is at hand; skips if there is none."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        return yaml.safe_load(text_path.read_text())
    tried = []
    for python in ("/usr/bin/python3", shutil.which("python3")):
        if not python or not os.path.exists(python) or python in tried:
            continue
        tried.append(python)
        try:
            done = subprocess.run(
                [python, "-c", YAML_TO_JSON, str(text_path)], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return json.loads(done.stdout)
    pytest.skip(f"no YAML parser: PyYAML is not installed here nor in {tried or 'a system python3'}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = _yaml_to_data(COMPOSE)
    return data


def _role(service: dict[str, Any]) -> str:
    return str(service["command"][0])


def _networks(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks") or []
    return set(networks) if isinstance(networks, dict | list) else set()


def _on(compose: dict[str, Any], network: str) -> set[str]:
    return {name for name, service in compose["services"].items() if network in _networks(service)}


def _healthcheck_text(test: Any) -> str:
    if isinstance(test, str):
        return test
    kind, *rest = test
    assert kind in ("CMD", "CMD-SHELL"), f"unexpected healthcheck form {test!r}"
    return " ".join(rest)


def _parses_as_run(arguments: list[str]) -> None:
    """The real CLI accepts ``eidetica-node run ARGUMENTS`` (a usage error exits 2)."""
    args = build_parser().parse_args(["run", *arguments])
    assert args.command == "run"


# ---- the compose tool -----------------------------------------------------------------------


def test_compose_tool_accepts_the_file(tmp_path: Path) -> None:
    tool = _compose_tool()
    if tool is None:
        pytest.skip("no docker-compose or docker compose here (CI: apt-get install docker-compose)")
    done = subprocess.run(
        [*tool, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, cwd=REPO
    )
    assert done.returncode == 0, f"{' '.join(tool)} config: {done.stderr or done.stdout}"
    # What the tool makes of it (anchors merged, defaults filled in) still has the isolated LANs.
    done = subprocess.run(
        [*tool, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    normalized = tmp_path / "compose-config.yml"
    normalized.write_text(done.stdout)
    data = _yaml_to_data(normalized)
    assert data["networks"]["lan1"]["internal"] is True
    assert data["networks"]["lan2"]["internal"] is True
    assert set(data["services"]) == {"relay", "seed", "lan1-peer", "lan2-peer"}


# ---- the mesh it describes -------------------------------------------------------------------


def test_lans_are_internal_and_share_only_the_relay(compose: dict[str, Any]) -> None:
    networks = compose["networks"]
    assert networks["lan1"].get("internal") is True
    assert networks["lan2"].get("internal") is True
    assert not (networks.get("public") or {}).get("internal"), "the relay's public network reaches out"
    relays = [name for name, service in compose["services"].items() if _role(service) == "relay"]
    assert relays == ["relay"]
    assert _on(compose, "lan1") & _on(compose, "lan2") == {"relay"}
    assert _on(compose, "public") == {"relay"}
    for name, service in compose["services"].items():
        assert _networks(service) <= {"public", "lan1", "lan2"}, f"{name} is on an unexpected network"
        assert "network_mode" not in service, f"{name} must not bypass the networks"
        if name != "relay":
            assert "ports" not in service, f"{name} must not be published: only the relay is reachable from outside"
            assert len(_networks(service)) == 1, f"{name} must sit on one LAN only"


def test_seed_and_joiners(compose: dict[str, Any]) -> None:
    services = compose["services"]
    roles = {name: _role(service) for name, service in services.items()}
    assert set(roles.values()) <= set(ROLES)
    seeds = [name for name, role in roles.items() if role == "seed"]
    peers = [name for name, role in roles.items() if role == "peer"]
    assert len(seeds) == 1 and len(peers) >= 2 and len(seeds) + len(peers) >= 3
    lans_with_nodes = {net for name in seeds + peers for net in _networks(services[name])}
    assert lans_with_nodes == {"lan1", "lan2"}, "nodes on both LANs"
    assert _on(compose, "lan2") - {"relay"} <= set(peers), "the other LAN joins through the relay"
    # start order: the relay's addresses, then the seed's ticket, are published before they are read
    assert services[seeds[0]]["depends_on"]["relay"]["condition"] == "service_healthy"
    for name in peers:
        depends = services[name]["depends_on"]
        assert depends["relay"]["condition"] == "service_healthy"
        assert depends[seeds[0]]["condition"] == "service_healthy"
    assert "/mesh/relay.addrs" in _healthcheck_text(services["relay"]["healthcheck"]["test"])
    assert "/mesh/ticket" in _healthcheck_text(services[seeds[0]]["healthcheck"]["test"])


def test_every_node_runs_and_is_checked_with_eidetica_node(compose: dict[str, Any]) -> None:
    data_volumes = []
    for name, service in compose["services"].items():
        assert service["entrypoint"] == ["mesh-node"], f"{name}: the image's scripts/mesh-node.sh"
        assert service.get("build") == "." and service.get("image"), f"{name}: built from this repository"
        role, *run_arguments = service["command"]
        assert role in ROLES
        _parses_as_run(run_arguments)
        health = _healthcheck_text(service["healthcheck"]["test"])
        assert re.search(r"\beidetica-node health\b", health), f"{name}: healthcheck {health!r}"
        volumes = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert volumes.get("/mesh") == "mesh", f"{name} shares the mesh volume"
        data_volumes.append(volumes["/data"])
        assert service["environment"]["EIDETICA_DATA_DIR"] == "/data"
        assert service["environment"]["MESH_DIR"] == "/mesh"
        assert service["environment"]["EIDETICA_P2P_LISTEN"].startswith("/ip4/0.0.0.0/tcp/")
    assert len(set(data_volumes)) == len(data_volumes), "every node has its own data volume"
    assert set(data_volumes) | {"mesh"} <= set(compose["volumes"])


def test_mesh_node_script() -> None:
    assert os.access(MESH_NODE, os.X_OK), "the image copies it with its mode"
    done = subprocess.run(["bash", "-n", str(MESH_NODE)], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    text = MESH_NODE.read_text()
    assert "run_args=(--relay-service" in text  # the relay role offers the relay service
    assert "eidetica-node run" in text and "eidetica-node join" in text and "eidetica-node share" in text
    usage = subprocess.run(["bash", str(MESH_NODE)], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert usage.returncode == 2 and "usage" in usage.stderr


# ---- Dockerfile and context ------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _one(stage: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in stage if w == word]
    assert len(found) == 1, f"expected one {word} in the final stage, found {found}"
    return found[0]


def test_dockerfile() -> None:
    stage = _final_stage()
    assert stage[0][1].startswith("python:3.11-slim")
    user = _one(stage, "USER")
    assert user not in ("root", "0") and not user.startswith("0:")
    assert json.loads(_one(stage, "VOLUME")) == ["/data"]
    assert _one(stage, "EXPOSE").split() == ["4001", "8080"]
    env = " ".join(rest for word, rest in stage if word == "ENV")
    assert "EIDETICA_DATA_DIR=/data" in env.split()
    health = _one(stage, "HEALTHCHECK")
    assert "--interval=" in health
    health_cmd = json.loads(health.split(" CMD ", 1)[1])
    assert health_cmd[:2] == ["eidetica-node", "health"]
    build_parser().parse_args(health_cmd[1:])  # flags the real CLI takes
    assert json.loads(_one(stage, "ENTRYPOINT")) == ["eidetica-node"]
    cmd = json.loads(_one(stage, "CMD"))
    assert cmd[0] == "run"
    args = build_parser().parse_args(cmd)
    assert all(address.startswith("/ip4/0.0.0.0/") for address in args.p2p_listen)
    assert args.http_bind.startswith("0.0.0.0:")
    installs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    assert re.search(r"pip install [^&]*\s\.(\s|$)", installs), "the project is installed with pip install ."


def test_dockerignore_lets_through_what_the_dockerfile_copies() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "everything is excluded unless listed"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for word, rest in _instructions():
        if word != "COPY" or "--from=" in rest:
            continue
        *sources, _dest = rest.split()
        for source in sources:
            source = source.rstrip("/")
            assert (REPO / source).exists(), f"COPY {source}: no such file"
            assert source in allowed or any(source.startswith(a + "/") for a in allowed), (
                f"COPY {source} is excluded by .dockerignore"
            )
    assert not {".venv", ".git", "data", "tests"} & allowed
