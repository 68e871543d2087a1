"""cluster.yaml passes Ray's own cluster-launcher validation offline, and a typo does not."""
import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def validated(config: dict) -> dict:
    """What `ray up` does before it launches anything: fill defaults, then check the schema."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def aws_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def onprem_config() -> dict:
    """The commented `provider: local` block at the end of cluster.yaml, uncommented."""
    text = CLUSTER_YAML.read_text()
    block = re.search(r"^# BEGIN ON-PREMISES\n(.*?)^# END ON-PREMISES", text, re.S | re.M)
    assert block, "cluster.yaml lost its on-premises block"
    return yaml.safe_load("\n".join(line[2:] for line in block.group(1).splitlines()))


def test_aws_cluster_config_is_valid():
    config = validated(aws_config())
    types = config["available_node_types"]
    assert config["provider"]["type"] == "aws"
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # nothing trains on the head
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)  # autoscaling from zero
    assert all(t["node_config"]["InstanceType"].startswith("g5.") for t in gpu_types)
    setup = " ".join(config["head_setup_commands"] + config["worker_setup_commands"])
    for pin in ("torch==2.14.1", "torchvision==0.29.1", "ray[default,train,tune,serve]==2.60.0"):
        assert pin in setup
    for start in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in start
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_onprem_variant_is_valid():
    config = validated(onprem_config())
    assert config["provider"]["type"] == "local"
    assert len(config["provider"]["worker_ips"]) == 2


@pytest.mark.parametrize("mutate,error,match", [
    (lambda c: c.update(max_worker=4), jsonschema.ValidationError, "'max_worker' was unexpected"),  # typo
    (lambda c: c["available_node_types"]["gpu_1x"].update(min_worker=1), jsonschema.ValidationError,
     "'min_worker' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_1x"].pop("resources"), jsonschema.ValidationError,
     "'resources' is a required property"),
    (lambda c: c["available_node_types"]["gpu_1x"]["resources"].update(GPU=0.5), jsonschema.ValidationError,
     "not of type 'integer'"),
    (lambda c: c.update(head_node_type="cpu_head"), ValueError, "must be one of"),
])
def test_a_typo_fails_validation(mutate, error, match):
    config = aws_config()
    mutate(config)
    with pytest.raises(error, match=match):
        validated(config)
