#!/usr/bin/env bash
# Everything about the Kubernetes packaging that can be checked without a cluster: core manifests
# against Kubernetes' schemas, the kustomization's files, the hook annotation against what the
# sidecar and KubeVirt accept, the Containerfiles (hadolint) and the kind workflow (actionlint).
set -euo pipefail
cd "$(dirname "$0")/.."

# What `kubectl apply -k manifests/` would send, built offline; core kinds against Kubernetes'
# schemas, KubeVirt kinds against the pinned schemas of the supported releases (ci/kubevirt-schema.py).
built=$(mktemp -d)
trap 'rm -rf "$built"' EXIT
kubectl kustomize manifests >"$built/all.yaml"
python3 - "$built" <<'PY'
import sys, yaml
out = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open(f"{out}/all.yaml")) if d]
kinds = sorted(d["kind"] for d in docs)
assert kinds == ["ConfigMap", "Service", "VirtualMachine"], kinds
with open(f"{out}/core.yaml", "w") as f:
    yaml.safe_dump_all([d for d in docs if d["apiVersion"] == "v1"], f)
PY
kubernetes-validate --strict --quiet "$built/core.yaml"
kubernetes-validate --strict --quiet manifests/recording/pvc.yaml
for schema in tests/data/kubevirt-v*-schema.json; do
  python3 ci/kubevirt-schema.py check "$schema" "$built/all.yaml"
  python3 ci/kubevirt-schema.py check "$schema" --patch manifests/kubevirt-cr-patch.yaml
done
# Plugin mode (KubeVirt >= 1.9): the same, the Plugin CR against its pinned schema (hand-written
# from KubeVirt's types.go: the CRD is not in the OpenAPI document), and every CEL expression
# (admission policy, JSONPatch, Plugin condition) parsed offline with cel-python.
kubectl kustomize manifests/plugin >"$built/plugin.yaml"
python3 - "$built" <<'PY'
import sys, yaml
out = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open(f"{out}/plugin.yaml")) if d]
kinds = sorted(d["kind"] for d in docs)
assert kinds == ["MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding", "Plugin", "Secret",
                 "Service", "VirtualMachine"], kinds
with open(f"{out}/plugin-core.yaml", "w") as f:
    yaml.safe_dump_all([d for d in docs if d["kind"] not in ("Plugin", "VirtualMachine")], f)
PY
kubernetes-validate --strict --quiet "$built/plugin-core.yaml"
python3 ci/kubevirt-schema.py check tests/data/kubevirt-v1.9.0-schema.json "$built/plugin.yaml"
python3 ci/kubevirt-schema.py check tests/data/kubevirt-v1.9.0-schema.json --patch \
  manifests/plugin/kubevirt-cr-patch.yaml
python3 ci/kubevirt-schema.py check tests/data/kubevirt-plugin-v1alpha1-schema.json "$built/plugin.yaml"

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
allowed = {"image", "imagePullPolicy", "command", "args", "configMap", "pvc"}
help_text = os.environ["VDI_SERVE_HELP"]

def check_hooks(hooks):
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

hooks = json.loads(tmpl["metadata"]["annotations"]["hooks.kubevirt.io/hookSidecars"])
check_hooks(hooks)

# Recording (manifests/recording/): the merge patch keeps the demo's entry, adds the claim, and
# --record-dir is where the claim is mounted; the bound fits the claim.
patch = load("manifests/recording/vm-patch.yaml")[0]
rec_hooks = json.loads(patch["spec"]["template"]["metadata"]["annotations"]["hooks.kubevirt.io/hookSidecars"])
check_hooks(rec_hooks)
assert len(rec_hooks) == len(hooks) == 1, "one sidecar entry"
base, rec = hooks[0], rec_hooks[0]
for k in ("image", "imagePullPolicy", "configMap"):
    assert rec.get(k) == base.get(k), f"the recording patch changes {k}"
assert rec["args"][: len(base["args"])] == base["args"], "the recording patch drops the demo's flags"
pvc_doc = load("manifests/recording/pvc.yaml")[0]
assert pvc_doc["kind"] == "PersistentVolumeClaim" and rec["pvc"]["name"] == pvc_doc["metadata"]["name"]
rargs = rec["args"]
assert rargs[rargs.index("--record-dir") + 1] == rec["pvc"]["volumePath"], \
    "--record-dir is not the claim's mount"
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
def size(text):
    m = re.fullmatch(r"(\d+)([KMG]i?)?", text)
    assert m, text
    return int(m.group(1)) * units.get(m.group(2) or "", 1)
assert size(rargs[rargs.index("--record-max-bytes") + 1]) < size(pvc_doc["spec"]["resources"]["requests"]["storage"]), \
    "--record-max-bytes must stay below the claim's size"

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

# Plugin mode: names, paths and flags agree across the Plugin CR, the admission policy (whose
# JSONPatch is CEL), the VM and the Service; every CEL expression parses.
import celpy
env = celpy.Environment()
def cel(expr, what):
    try:
        env.compile(expr)
    except Exception as e:
        raise AssertionError(f"{what}: CEL does not parse: {e}")

pdocs = {}
for res in load("manifests/plugin/kustomization.yaml")[0]["resources"]:
    for d in load(os.path.join("manifests/plugin", res)):
        pdocs[(d["kind"], d["metadata"]["name"])] = d
plugin = next(d for (k, _), d in pdocs.items() if k == "Plugin")
name = plugin["metadata"]["name"]
cel(plugin["spec"]["condition"], "Plugin condition")
hooks = plugin["spec"]["domainHooks"]
assert len(hooks) == 1 and hooks[0]["sidecar"]["socketPath"] == f"/var/run/kubevirt-plugin/{name}/hook.sock", hooks
assert len(hooks[0]["sidecar"]["socketPath"]) <= 108
for h in hooks:
    assert h.get("failureStrategy") and h.get("timeout"), "explicit failureStrategy and timeout"
    if "condition" in h:
        cel(h["condition"], "domain hook condition")
policy = next(d for (k, _), d in pdocs.items() if k == "MutatingAdmissionPolicy")
binding = next(d for (k, _), d in pdocs.items() if k == "MutatingAdmissionPolicyBinding")
assert binding["spec"]["policyName"] == policy["metadata"]["name"]
for mc in policy["spec"]["matchConditions"]:
    cel(mc["expression"], f"matchCondition {mc['name']}")
patch = policy["spec"]["mutations"][0]["jsonPatch"]["expression"]
cel(patch, "JSONPatch")
args = re.search(r"args:\s*\[([^\]]*)\]", patch).group(1)
args = re.findall(r'"([^"]*)"', args)
assert args[args.index("--mode") + 1] == "plugin", args
assert args[args.index("--plugin-name") + 1] == name, f"--plugin-name is not the Plugin's name {name}"
for a in args:
    if a.startswith("--"):
        assert re.search(rf"(^|\s){re.escape(a)}\b", help_text, re.M), f"{a} is not a serve flag"
assert f'mountPath: "/var/run/kubevirt-plugin/{name}/"' in patch and f'subPath: "{name}"' in patch, \
    "the plugin's directory is not mounted with subPath <name>"
assert "runAsUser: 107" in patch and 'drop: ["ALL"]' in patch and '"RuntimeDefault"' in patch
assert '"/readyz"' in patch and '"/healthz"' in patch, "probes"
pvm = next(d for (k, _), d in pdocs.items() if k == "VirtualMachine")
ptmpl = pvm["spec"]["template"]
assert "hooks.kubevirt.io/hookSidecars" not in ptmpl["metadata"].get("annotations", {}), \
    "no hook annotation in plugin mode"
plabels = ptmpl["metadata"]["labels"]
assert "vdi.kubevirt.io/desktop" in plabels, "the Plugin condition and the policy select this label"
assert "sound" in ptmpl["spec"]["domain"]["devices"]
psvc = next(d for (k, _), d in pdocs.items() if k == "Service")
assert all(plabels.get(k) == v for k, v in psvc["spec"]["selector"].items())
assert {5900, 3389, 6080} <= {p["port"] for p in psvc["spec"]["ports"]}
for iface in ptmpl["spec"]["domain"]["devices"]["interfaces"]:
    if "masquerade" in iface:
        assert iface.get("ports"), "masquerade without ports swallows the sidecar's ports"
print("packaging: manifests, annotation, plugin mode, Containerfiles and workflow check out")
PY

# Monitoring: the scrape job is YAML with the Service's port name, and every metric the Grafana
# dashboard queries is one the sidecar exports (src/metrics.rs names each family once).
python3 - <<'PY'
import json, re, yaml
scrape = yaml.safe_load(open("manifests/monitoring/prometheus-scrape.yaml"))
job = scrape["scrape_configs"][0]
assert any(r.get("regex") == "metrics" for r in job["relabel_configs"]), job
svc = yaml.safe_load(open("manifests/service.yaml"))
assert any(p["name"] == "metrics" for p in svc["spec"]["ports"]), "no metrics port on the Service"
src = open("src/metrics.rs").read()
dash = json.load(open("manifests/monitoring/grafana-dashboard.json"))
names = set()
for panel in dash["panels"]:
    for t in panel["targets"]:
        names |= set(re.findall(r"\b((?:vdi|process)_[a-z_]+)\{", t["expr"]))
assert names, "the dashboard queries nothing"
for n in sorted(names):
    base = re.sub(r"_(bucket|count|sum)$", "", n)
    base = re.sub(r"_total$", "", base)
    base = re.sub(r"_(bytes|seconds)$", "", base)
    assert f'"{base}"' in src, f"the dashboard queries {n}, which src/metrics.rs does not export"
print(f"monitoring: scrape job and dashboard ({len(names)} metrics) check out")
PY
