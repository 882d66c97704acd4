#!/usr/bin/env bash
# Renders every kustomization under deploy/kubernetes with `kubectl kustomize` (offline) and
# validates every object, strictly (unknown fields are errors), against the Kubernetes 1.28 schemas
# and the newest ones shipped by the `kubernetes-validate` package from PyPI (installed into a venv
# outside the repository: $TOFFEE_K8S_VENV, default ~/.cache/toffee/k8s-validate-venv).
#
#   tools/cluster/k8s-validate.sh                 # the kustomizations
#   tools/cluster/k8s-validate.sh some.yaml ...   # plain manifest files instead
#
# Exits 0 when every object is valid for every version, 1 otherwise; 2 when the tools are missing.
# Env: K8S_VERSIONS (default "1.28.0 newest"), KUBERNETES_VALIDATE_VERSION (default 1.37.0).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${TOFFEE_K8S_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/toffee/k8s-validate-venv}"
pin="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"

if ! command -v kubectl >/dev/null; then echo "k8s-validate: kubectl is needed (for kustomize)" >&2; exit 2; fi
if ! "$venv/bin/python" -c "import kubernetes_validate" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "kubernetes-validate==$pin"
fi
kv="$venv/bin/kubernetes-validate"

# The newest schema version the package has ("1.37.0" for kubernetes-validate 1.37.0).
newest="$("$venv/bin/python" - <<'PY'
import os, re, kubernetes_validate
d = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
vs = [tuple(map(int, m.groups())) for n in os.listdir(d) if (m := re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)-local", n))]
print("%d.%d.%d" % max(vs))
PY
)"
versions="${K8S_VERSIONS:-1.28.0 newest}"
versions="${versions//newest/$newest}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

files=()
if (($#)); then
    files=("$@")
else
    for k in "$repo"/deploy/kubernetes/*/kustomization.yaml; do
        d="$(dirname "$k")"; name="$(basename "$d")"
        kubectl kustomize "$d" >"$work/$name.yaml"
        echo "rendered deploy/kubernetes/$name: $(grep -c '^kind:' "$work/$name.yaml") object(s)"
        files+=("$work/$name.yaml")
    done
    # The Job kustomization must not carry the volumes: `kubectl delete -k` of it would delete the data.
    if grep -q '^kind: PersistentVolumeClaim' "$work/job.yaml"; then
        echo "FAIL deploy/kubernetes/job renders a PersistentVolumeClaim" >&2; exit 1
    fi
fi

status=0
for v in $versions; do
    for f in "${files[@]}"; do
        if "$kv" --strict --kubernetes-version "$v" "$f"; then :; else status=1; fi
    done
done
if ((status)); then echo "k8s-validate: INVALID (see ERROR lines above)"; else echo "k8s-validate: all objects valid for Kubernetes $versions"; fi
exit "$status"
