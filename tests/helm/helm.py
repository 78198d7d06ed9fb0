#!/usr/bin/env python3
"""Helm (v4, the `helm-python-sdk` PyPI package) for the chart tests.

Usage: helm.py COMMAND JSON-ARGS. Prints one JSON document on stdout.

  render    {"chart", "values", "namespace", "name"}  -> {"objects": [{"template", "object"}]}
  lint      {"chart", "values", "namespace"}          -> the lint report
  validate  {"chart", "values"}                       -> {"ok": bool, "error": str}
  crds      {"chart"}                                 -> [{"name", "filename", "data"}]
  install / upgrade  {"kubeconfig", "chart", "values", "namespace", "name"} -> release summary
  uninstall {"kubeconfig", "namespace", "name"}       -> uninstall result

Exit code 3 with a message on stderr when a needed Python package is
missing; 2 for a Helm error (message on stderr).
"""

import json
import sys

try:
    import helm_python as helm
except ImportError as e:  # pragma: no cover - the message is the point
    print(f"missing Python package: {e}; install it with `pip install helm-python-sdk`", file=sys.stderr)
    sys.exit(3)
try:
    import yaml
except ImportError as e:
    print(f"missing Python package: {e}; install it with `pip install pyyaml`", file=sys.stderr)
    sys.exit(3)


def render(a):
    with helm.Chart.load(a["chart"]) as chart:
        manifests = chart.render(
            values=a.get("values"),
            name=a.get("name", "ferry"),
            namespace=a.get("namespace", "ferry-system"),
            is_install=True,
        )
    objects = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append({"template": template, "object": doc})
    return {"objects": objects}


def lint(a):
    return helm.lint(a["chart"], a.get("values"), strict=True, namespace=a.get("namespace", "ferry-system"))


def validate(a):
    with helm.Chart.load(a["chart"]) as chart:
        try:
            chart.validate_schema(a.get("values"))
            return {"ok": True, "error": ""}
        except helm.HelmValuesError as e:
            return {"ok": False, "error": str(e)}


def crds(a):
    with helm.Chart.load(a["chart"]) as chart:
        return chart.crds


def release(command, a):
    with helm.Config(kubeconfig_path=a["kubeconfig"], namespace=a["namespace"]) as cfg:
        if command == "install":
            r = cfg.install(a["chart"], a["name"], a.get("values"), namespace=a["namespace"],
                            create_namespace=True, timeout=60)
        elif command == "upgrade":
            r = cfg.upgrade(a["chart"], a["name"], a.get("values"), namespace=a["namespace"], timeout=60)
        else:
            r = cfg.uninstall(a["name"], wait="watcher", timeout=60)
        return json.loads(json.dumps(r, default=str))


def main():
    command, args = sys.argv[1], json.loads(sys.argv[2])
    try:
        if command == "render":
            out = render(args)
        elif command == "lint":
            out = lint(args)
        elif command == "validate":
            out = validate(args)
        elif command == "crds":
            out = crds(args)
        elif command in ("install", "upgrade", "uninstall"):
            out = release(command, args)
        else:
            print(f"unknown command {command}", file=sys.stderr)
            sys.exit(2)
    except helm.HelmError as e:
        print(f"helm {command}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
