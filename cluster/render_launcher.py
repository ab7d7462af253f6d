"""Write the launcher config for one AWS account from the template cluster/aws-a100.yaml.

    python cluster/render_launcher.py --security-group sg-0123456789abcdef0 \\
        --registry 123456789012.dkr.ecr.us-west-2.amazonaws.com [--placement-group vistralv-p4d]

fills in what only your account knows: the security group every node type joins (made by the README's
commands, SSH open only to your CIDR), the registry that holds the image (with the ECR login each node
runs before pulling) and, optionally, a cluster placement group for the GPU nodes. The output,
cluster/aws-a100.local.yaml by default, is git-ignored and checked against Ray's own schema. Offline:
no AWS call is made here.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parent
TEMPLATE = CLUSTER / "aws-a100.yaml"
IMAGE_NAME = "vistralv-ray:"
SECURITY_GROUP = re.compile(r"^sg-[0-9a-f]{8,17}$")
ECR_REGISTRY = re.compile(r"^\d{12}\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com$")
OPEN_TO_ALL = ("0.0.0.0/0", "::/0")


def render(
    template: dict, security_group: str, registry: str | None = None, placement_group: str | None = None
) -> dict:
    """The template with the account's values; raises ValueError on a malformed one."""
    if not SECURITY_GROUP.match(security_group):
        raise ValueError(f"--security-group {security_group}: expected an id like sg-0123456789abcdef0")
    config = copy.deepcopy(template)
    for node in config["available_node_types"].values():
        node["node_config"]["SecurityGroupIds"] = [security_group]
        if placement_group and node.get("resources", {}).get("GPU"):
            node["node_config"]["Placement"] = {"GroupName": placement_group}
    if registry:
        registry = registry.rstrip("/")

        def fill(image: str) -> str:
            return f"{registry}/{image}" if image.startswith(IMAGE_NAME) else image

        config["docker"]["image"] = fill(config["docker"]["image"])
        for node in config["available_node_types"].values():
            if "worker_image" in node.get("docker", {}):
                node["docker"]["worker_image"] = fill(node["docker"]["worker_image"])
        if match := ECR_REGISTRY.match(registry):
            # Every node logs in with its instance profile before Ray pulls the image.
            login = (
                f"aws ecr get-login-password --region {match.group(1)} | "
                f"docker login --username AWS --password-stdin {registry}"
            )
            config["initialization_commands"] = [login]
    text = yaml.safe_dump(config)
    if any(cidr in text for cidr in OPEN_TO_ALL):
        raise ValueError("the rendered config opens something to the whole internet (0.0.0.0/0 or ::/0)")
    return config


def validate(config: dict) -> None:
    """Ray's own schema check of a launcher config (offline)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--security-group", required=True, help="sg-... id from the README's setup commands")
    p.add_argument("--registry", default=None, help="registry that holds the image, e.g. an ECR host")
    p.add_argument("--placement-group", default=None, help="cluster placement group for the GPU nodes")
    p.add_argument("--template", type=Path, default=TEMPLATE)
    p.add_argument("-o", "--out", type=Path, default=CLUSTER / "aws-a100.local.yaml")
    args = p.parse_args(argv)
    try:
        config = render(yaml.safe_load(args.template.read_text()), args.security_group, args.registry,
                        args.placement_group)  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    validate(config)
    header = f"# Rendered from {args.template.name} by cluster/render_launcher.py; edit the template, not this.\n"
    args.out.write_text(header + yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {args.out}: ray up {args.out} -y")
    return 0


if __name__ == "__main__":
    sys.exit(main())
