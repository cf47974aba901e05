#!/usr/bin/env python3
"""Pinned KubeVirt schema for offline manifest checks.

  kubevirt-schema.py generate SWAGGER.json TAG OUT.json
      Keep from KubeVirt's published OpenAPI document (api/openapi-spec/swagger.json of a release
      tag) only the definitions that VirtualMachine and KubeVirt reach, without descriptions, and
      close every object that lists its properties (additionalProperties: false) so a misspelt or
      misplaced field fails, like `kubernetes-validate --strict` does for core kinds.

  kubevirt-schema.py check SCHEMA.json [--patch] FILE...
      Validate every KubeVirt document in FILE (multi-document YAML). With --patch the documents are
      merge patches: `required` is dropped, everything else still applies.
"""
import json
import sys

ROOTS = ("v1.VirtualMachine", "v1.KubeVirt")


def generate(swagger_path, tag, out_path):
    with open(swagger_path) as f:
        defs = json.load(f)["definitions"]
    keep, todo = {}, list(ROOTS)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = strip(defs[name], todo)
    out = {"x-kubevirt-release": tag, "x-generated-by": "ci/kubevirt-schema.py", "definitions": keep}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")


def strip(node, todo):
    if isinstance(node, list):
        return [strip(n, todo) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("description", "default", "example"):
            continue
        if k == "$ref":
            todo.append(v.rsplit("/", 1)[-1])
        out[k] = v if k == "required" else strip(v, todo)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def drop_required(node):
    if isinstance(node, list):
        return [drop_required(n) for n in node]
    if isinstance(node, dict):
        return {k: drop_required(v) for k, v in node.items() if k != "required"}
    return node


def check(schema_path, paths, patch):
    import jsonschema
    import yaml

    with open(schema_path) as f:
        pinned = json.load(f)
    defs = drop_required(pinned["definitions"]) if patch else pinned["definitions"]
    failed = checked = 0
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            kind = doc.get("kind", "KubeVirt" if patch else None)
            version = doc.get("apiVersion", "kubevirt.io/v1").rsplit("/", 1)[-1]
            name = f"{version}.{kind}"
            if name not in defs:
                continue
            schema = {"$ref": f"#/definitions/{name}", "definitions": defs}
            validator = jsonschema.Draft4Validator(schema)
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
            checked += 1
            for e in errors:
                failed += 1
                where = "/".join(str(p) for p in e.path)
                print(f"{path}: {kind} at /{where}: {e.message}", file=sys.stderr)
    if failed or not checked:
        sys.exit(f"kubevirt schema ({pinned.get('x-kubevirt-release')}): {failed} errors, {checked} documents")
    print(f"kubevirt schema ({pinned.get('x-kubevirt-release')}): {checked} documents valid")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "generate":
        generate(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) >= 4 and sys.argv[1] == "check":
        rest = sys.argv[3:]
        patch = "--patch" in rest
        check(sys.argv[2], [p for p in rest if p != "--patch"], patch)
    else:
        sys.exit(__doc__)
