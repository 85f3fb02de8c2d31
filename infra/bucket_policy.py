"""Render infra/s3/namespace-policy.json: each namespace's principal may touch only `{root}/{namespace}/*`.

    python -m infra.bucket_policy s3://prefixfleet/fleet acme=arn:aws:iam::123456789012:role/acme ...
    python -m infra.bucket_policy s3://prefixfleet/fleet --identity acme

The first form prints one bucket policy for all the namespaces given; the second prints the grants
of one namespace as an identity policy, for its own IAM role or MinIO user.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from string import Template
from typing import Any

TEMPLATE = Path(__file__).parent / "s3" / "namespace-policy.json"
MAX_BUCKET_POLICY_BYTES = 20 * 1024  # S3 refuses larger bucket policies
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# No IAM wildcards (* ?) and no "/" in a namespace: either would widen the prefix it is granted.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def parse_store(store: str) -> tuple[str, str]:
    """Split a PREFIXFLEET_STORE such as `s3://bucket/root` into (bucket, root); root may be empty."""
    if not store.startswith("s3://"):
        raise ValueError(f"store must look like s3://bucket/prefix, got {store!r}")
    bucket, _, root = store[len("s3://"):].partition("/")
    root = root.strip("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"not an S3 bucket name: {bucket!r}")
    if root and not all(_SEGMENT.fullmatch(part) for part in root.split("/")):
        raise ValueError(f"store prefix {root!r} may hold only letters, digits, '.', '_', '-' and '/'")
    return bucket, root


def namespace_prefix(root: str, namespace: str) -> str:
    """The key prefix that holds everything of one namespace: `{root}/{namespace}/`."""
    if not _SEGMENT.fullmatch(namespace):
        raise ValueError(
            f"namespace {namespace!r} must start with a letter or digit and hold only letters, "
            "digits, '.', '_' and '-' (at most 128)"
        )
    return f"{root}/{namespace}/" if root else f"{namespace}/"


def _substitute(node: Any, values: Mapping[str, str]) -> Any:
    """Fill `${NAME}` placeholders in every string of a parsed JSON document."""
    if isinstance(node, str):
        return Template(node).substitute(values)
    if isinstance(node, list):
        return [_substitute(item, values) for item in node]
    if isinstance(node, dict):
        return {key: _substitute(item, values) for key, item in node.items()}
    return node


def namespace_statements(store: str, namespace: str, principal: str | None) -> list[dict[str, Any]]:
    """The template's statements for one namespace.

    Without a principal they take identity-policy form: no Principal and no Deny, since an identity
    policy grants nothing beyond its Allow statements anyway.
    """
    if principal is not None and (not principal.startswith("arn:") or "*" in principal):
        raise ValueError(f"principal must be one ARN without wildcards, got {principal!r}")
    bucket, root = parse_store(store)
    values = {"BUCKET": bucket, "PREFIX": namespace_prefix(root, namespace), "PRINCIPAL": principal or ""}
    statements: list[dict[str, Any]] = _substitute(json.loads(TEMPLATE.read_text())["Statement"], values)
    if principal is None:
        statements = [s for s in statements if s["Effect"] == "Allow"]
        for statement in statements:
            del statement["Principal"]
    return statements


def bucket_policy(store: str, principals: Mapping[str, str]) -> dict[str, Any]:
    """One bucket policy: each namespace's principal gets its own prefix and no other key in the bucket."""
    if not principals:
        raise ValueError("give at least one NAMESPACE=PRINCIPAL_ARN")
    statements = [
        {**statement, "Sid": f"{statement['Sid']}{index}"}
        for index, namespace in enumerate(sorted(principals))
        for statement in namespace_statements(store, namespace, principals[namespace])
    ]
    policy = {"Version": "2012-10-17", "Statement": statements}
    size = len(json.dumps(policy, separators=(",", ":")))
    if size > MAX_BUCKET_POLICY_BYTES:
        raise ValueError(
            f"bucket policy is {size} bytes, over S3's {MAX_BUCKET_POLICY_BYTES}: "
            "attach per-namespace identity policies (--identity) instead"
        )
    return policy


def identity_policy(store: str, namespace: str) -> dict[str, Any]:
    """The grants of one namespace as a policy for that namespace's own IAM role or MinIO user."""
    return {"Version": "2012-10-17", "Statement": namespace_statements(store, namespace, None)}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the rendered policy as JSON; exit 2 with a one-line reason on bad input."""
    parser = argparse.ArgumentParser(prog="python -m infra.bucket_policy", description=__doc__.splitlines()[0])
    parser.add_argument("store", help="PREFIXFLEET_STORE, s3://bucket/prefix")
    parser.add_argument("grants", nargs="*", metavar="NAMESPACE=PRINCIPAL_ARN")
    parser.add_argument("--identity", metavar="NAMESPACE", help="print an identity policy for this namespace")
    args = parser.parse_args(argv)
    try:
        if args.identity is not None:
            if args.grants:
                raise ValueError("--identity takes no NAMESPACE=PRINCIPAL_ARN arguments")
            policy = identity_policy(args.store, args.identity)
        else:
            principals: dict[str, str] = {}
            for grant in args.grants:
                namespace, sep, principal = grant.partition("=")
                if not sep or namespace in principals:
                    raise ValueError(f"expected distinct NAMESPACE=PRINCIPAL_ARN, got {grant!r}")
                principals[namespace] = principal
            policy = bucket_policy(args.store, principals)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(policy, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
