"""The cluster configs parse, carry the fields their tools need, install this package and run an
entry point that exists in the repository."""

import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
RAYJOB = CLUSTER / "rayjob-label.yaml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def installs_pro2sam(commands: list[str]) -> bool:
    return any("pip install" in c and "pro2sam" in c for c in commands)


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.y*ml")), ids=lambda p: p.name)
def test_every_cluster_yaml_parses_to_a_mapping(path):
    assert isinstance(load(path), dict)


def test_launcher_config_has_an_aws_head_and_autoscaled_gpu_workers():
    config = load(LAUNCHER)
    assert config["cluster_name"]
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_workers = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers, "no worker node type with a GPU"
    for worker in gpu_workers:
        assert worker["node_config"]["InstanceType"].startswith(("g4dn", "g5", "g6", "p3", "p4", "p5"))
        assert 0 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]


def test_launcher_config_installs_this_package_on_every_node():
    config = load(LAUNCHER)
    commands = config.get("setup_commands", []) + config.get("worker_setup_commands", [])
    assert installs_pro2sam(commands) or any("pip install" in c and "~/pro2sam" in c for c in commands)
    # the working tree it installs is the repository, mounted on the nodes
    assert "." in config["file_mounts"].values()


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(LAUNCHER)))


def test_rayjob_has_the_kuberay_fields_and_a_gpu_worker_group():
    job = load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if any(c["resources"]["limits"].get("nvidia.com/gpu") == 1 for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, "no worker group with nvidia.com/gpu: 1"
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in gpu_groups)


def test_rayjob_runtime_env_installs_this_package():
    runtime_env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert any(str(p).startswith("pro2sam") for p in runtime_env["pip"])
    assert runtime_env["working_dir"]


def test_rayjob_entrypoint_runs_the_label_job_of_this_repository():
    argv = shlex.split(load(RAYJOB)["spec"]["entrypoint"])
    assert argv[0] == "python" and (REPO / argv[1]).is_file()
    assert argv[1] == "jobs/label.py"
    from pro2sam.apps.cli import build_parser

    args = build_parser().parse_args(["label", *argv[2:]])  # every option is one the job knows
    assert args.input and args.output and args.gtformer


def test_rayjob_asks_for_the_gpu_workers_it_autoscales_to():
    """The GPU workers start at zero: the job must ask for GPUs, or it labels on the head's CPU."""
    from pro2sam.apps.cli import build_parser

    job = load(RAYJOB)
    args = build_parser().parse_args(["label", *shlex.split(job["spec"]["entrypoint"])[2:]])
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    max_gpus = sum(
        g["maxReplicas"] * sum(c["resources"]["limits"].get("nvidia.com/gpu", 0) for c in g["template"]["spec"]["containers"])
        for g in groups
    )
    assert args.gpus_per_actor == 1
    assert 1 <= args.actors <= max_gpus


def test_launcher_header_submits_an_entry_point_of_this_repository():
    submits = [line for line in LAUNCHER.read_text().splitlines() if "ray job submit" in line]
    assert submits
    for line in submits:
        script = line.split(" -- ", 1)[1].split()[1]
        assert (REPO / script).is_file()
