"""Deployment files: the Kubernetes manifests validate against the Kubernetes schema (kubernetes-validate) and fit
together; the Dockerfile's entrypoint and default arguments are a real `swarmgrad` command line."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from swarmgrad.cli import build_parser
from swarmgrad.config import load_config
from swarmgrad.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.37.0"
A_PEER_ID = "12D3KooWKFkn4f2LDqachZ4iRLFFwPPYMA5qAjHY8T1LMjj6B1Bw"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instruction(name: str) -> list[str]:
    return [arg for kind, arg in dockerfile_instructions() if kind == name]


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def only(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in documents() if d["kind"] == kind]
    return doc


def test_entrypoint_is_the_console_script_and_cmd_parses() -> None:
    (entrypoint,) = instruction("ENTRYPOINT")
    (cmd,) = instruction("CMD")
    assert json.loads(entrypoint) == ["swarmgrad"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["swarmgrad"] == "swarmgrad.cli:main"
    args = build_parser("peer").parse_args(json.loads(cmd))
    assert args.command == "peer" and args.data_dir == Path("/data")
    (volume,) = instruction("VOLUME")
    assert json.loads(volume) == ["/data"]


def test_image_runs_as_a_non_root_user_with_cpu_torch() -> None:
    (user,) = instruction("USER")
    assert user not in ("root", "0")
    runs = " ".join(instruction("RUN"))
    assert "download.pytorch.org/whl/cpu" in runs and "-c constraints.txt" in runs
    assert re.search(r"^torch==", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    copied = {arg.split()[0] for arg in instruction("COPY")}
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    assert packages <= copied, f"the image misses packages {sorted(packages - copied)}"


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_validates_against_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_schema_validation_can_fail() -> None:
    broken = only("StatefulSet")
    broken["spec"]["replicaz"] = broken["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_statefulset_service_secret_and_config_fit_together(tmp_path: Path) -> None:
    service, statefulset, configmap = only("Service"), only("StatefulSet"), only("ConfigMap")
    secrets = {d["metadata"]["name"]: d for d in documents() if d["kind"] == "Secret"}
    assert service["spec"]["clusterIP"] == "None"  # headless: stable per-pod DNS names
    spec = statefulset["spec"]
    assert spec["serviceName"] == service["metadata"]["name"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    args = build_parser("peer").parse_args(container["args"])
    assert args.command == "peer"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]} == {"data"}
    assert str(args.data_dir) == mounts["data"]
    for volume in volumes.values():
        if "secret" in volume:
            assert volume["secret"]["secretName"] in secrets
        if "configMap" in volume:
            assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert "swarm.key" in secrets[volumes["swarm-key"]["secret"]["secretName"]]["stringData"]

    # the peer.toml the pods read is a valid config once the bootstrap peer's id is filled in
    path = tmp_path / "peer.toml"
    path.write_text(configmap["data"]["peer.toml"])
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "network.bootstrap"  # the placeholder is refused until replaced
    path.write_text(configmap["data"]["peer.toml"].replace("BOOTSTRAP_PEER_ID", A_PEER_ID))
    config = load_config(path)
    assert str(config.network.swarm_key).startswith(mounts["swarm-key"] + "/")
    assert str(config.peer.data_dir) == mounts["data"]
    port = container["ports"][0]["containerPort"]
    assert all(addr.endswith(f"/tcp/{port}") for addr in config.network.listen)
    assert config.network.bootstrap[0].startswith(
        f"/dns4/{statefulset['metadata']['name']}-0.{service['metadata']['name']}/"
    )
    if statefulset["spec"].get("podManagementPolicy") == "Parallel":  # joiners may start before pod 0 listens
        assert config.network.bootstrap_attempts * config.network.bootstrap_retry_s >= 30
