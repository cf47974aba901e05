#!/usr/bin/env bash
# Everything about the Kubernetes packaging that can be checked without a cluster: core manifests
# against Kubernetes' schemas, the kustomization's files, the hook annotation against what the
# sidecar and KubeVirt accept, the Containerfiles (hadolint) and the kind workflow (actionlint).
set -euo pipefail
cd "$(dirname "$0")/.."

kubernetes-validate --strict --quiet manifests/credentials.yaml manifests/service.yaml
hadolint --config .hadolint.yaml Containerfile virt-launcher/Containerfile
actionlint .github/workflows/*.yml

help=$(cargo run --quiet --locked --bin vdi-sidecar -- serve --help)
VDI_SERVE_HELP="$help" python3 - <<'PY'
import json, os, re, sys
import yaml

def load(path):
    with open(path) as f:
        return list(yaml.safe_load_all(f))

kust = load("manifests/kustomization.yaml")[0]
docs = {}
for res in kust["resources"]:
    for d in load(os.path.join("manifests", res)):
        docs[(d["kind"], d["metadata"]["name"])] = d

vm = docs[("VirtualMachine", "vdi-demo")]
tmpl = vm["spec"]["template"]
assert "hooks.kubevirt.io/hookSidecars" not in vm["metadata"].get("annotations", {}), \
    "the annotation belongs on the VMI template, not the VM"
hooks = json.loads(tmpl["metadata"]["annotations"]["hooks.kubevirt.io/hookSidecars"])
allowed = {"image", "imagePullPolicy", "command", "args", "configMap", "pvc"}
help_text = os.environ["VDI_SERVE_HELP"]
for h in hooks:
    extra = set(h) - allowed
    assert not extra, f"fields KubeVirt ignores or rejects: {extra}"
    assert h.get("image"), "no image: KubeVirt would run its sidecar-shim instead"
    assert h.get("imagePullPolicy", "IfNotPresent") in ("Always", "IfNotPresent", "Never")
    for a in h.get("args", []):
        if a.startswith("--"):
            flag = a.split("=")[0]
            assert re.search(rf"(^|\s){re.escape(flag)}\b", help_text, re.M), \
                f"{flag} is not a `vdi-sidecar serve` flag"
    cm = h.get("configMap")
    if cm:
        assert set(cm) <= {"name", "key", "hookPath"}, cm
        data = docs[("ConfigMap", cm["name"])]["data"]
        assert cm["key"] in data, f"ConfigMap {cm['name']} has no key {cm['key']}"
        args = h.get("args", [])
        assert "--password-file" in args and args[args.index("--password-file") + 1] == cm["hookPath"], \
            "the mounted credentials are not what --password-file reads"
    pvc = h.get("pvc")
    if pvc:
        assert set(pvc) <= {"name", "volumePath", "sharedComputePath"}, pvc

dev = tmpl["spec"]["domain"]["devices"]
assert "sound" in dev, "no sound device: the sidecar would leave audio out"
for iface in dev["interfaces"]:
    if "masquerade" in iface:
        assert iface.get("ports"), "masquerade without ports swallows the sidecar's ports"

svc = docs[("Service", "vdi-demo-desktop")]
labels = tmpl["metadata"]["labels"]
assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), \
    "the Service does not select the VM's pod"
ports = {p["port"] for p in svc["spec"]["ports"]}
assert {5900, 3389, 6080} <= ports, ports
print("packaging: manifests, annotation, Containerfiles and workflow check out")
PY
