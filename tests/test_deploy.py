"""deploy/: the Kubernetes manifests against the Kubernetes JSON schemas (kubernetes-validate ships them;
nothing is fetched), and every torchrun command line in deploy/ against torchrun's and the server's
own argument parsers, so a renamed flag fails here rather than in a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from torch.distributed.run import get_args_parser

from weightavg_server.ops.cli import build_parser

yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (pip install -e .[dev])")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (the Kubernetes JSON schemas) is not installed: pip install -e .[dev]"
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = "1.33.0"
"""The oldest Kubernetes the manifests target (gRPC probes and publishNotReadyAddresses are long GA)."""


def manifests() -> list[dict[str, Any]]:
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    assert docs, "no manifests in deploy/k8s"
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests() if d["kind"] == kind]


def check_torchrun(argv: list[str]) -> tuple[Any, Any]:
    """torchrun's parse of a command line, and the server's parse of what follows `-m weightavg_server serve`."""
    args = get_args_parser().parse_args(argv)
    assert args.module and args.training_script == "weightavg_server", argv
    assert args.training_script_args[0] == "serve", argv
    return args, build_parser().parse_args(args.training_script_args[1:])


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_matches_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises ValidationError naming the field


def test_the_statefulset_runs_torchrun_with_c10d_on_its_headless_service() -> None:
    (sts,) = by_kind("StatefulSet")
    headless = {s["metadata"]["name"] for s in by_kind("Service") if s["spec"].get("clusterIP") == "None"}
    assert sts["spec"]["serviceName"] in headless
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    run, serve = check_torchrun(container["args"])
    assert run.rdzv_backend == "c10d" and int(run.nnodes) == sts["spec"]["replicas"]
    assert run.rdzv_endpoint.startswith(f"{sts['metadata']['name']}-0.{sts['spec']['serviceName']}:")
    assert serve.state_dir in {m["mountPath"] for m in container["volumeMounts"]}
    assert container["readinessProbe"]["grpc"]["port"] == serve.port
    assert {p["containerPort"] for p in container["ports"]} >= {serve.port, int(run.rdzv_endpoint.rsplit(":", 1)[1])}


def test_the_compose_cluster_starts_two_nodes_meeting_at_node0() -> None:
    compose = yaml.safe_load((DEPLOY / "compose-cluster.yml").read_text())
    nodes = compose["services"]
    assert set(nodes) == {"node0", "node1"}
    for name, service in nodes.items():
        run, serve = check_torchrun(service["command"])
        assert (run.nnodes, run.rdzv_endpoint, run.local_addr) == ("2", "node0:29400", name)
        assert serve.device == "cpu" and serve.state_dir == "/state"


def test_the_image_owns_every_state_directory_the_compose_cluster_mounts() -> None:
    """A named volume mounted where the image has no folder is root's, 0755: the server (uid 10001)
    could write no snapshot there, and refuses to start on it (found by review). Docker copies the
    image's folder, owner and mode, into a new named volume."""
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    user = next(line.split()[1].split(":")[0] for line in dockerfile.splitlines() if line.startswith("USER "))
    compose = yaml.safe_load((DEPLOY / "compose-cluster.yml").read_text())
    for name, service in compose["services"].items():
        _, serve = check_torchrun(service["command"])
        mounts = {m.split(":")[1] for m in service["volumes"]}
        assert serve.state_dir in mounts, name
        assert f"mkdir -m 0700 {serve.state_dir} && chown {user}:{user} {serve.state_dir}" in dockerfile, name


def test_the_statefulset_runs_as_a_user_that_cannot_gain_privileges() -> None:
    """The image's user (uid 10001), enforced, with no way up: no escalation, no capabilities."""
    (sts,) = by_kind("StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    (container,) = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
