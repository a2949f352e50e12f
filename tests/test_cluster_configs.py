"""The cluster configs stay true: they parse, pin the project's Ray, name files that exist, fit
the GPU presets, keep token authentication on everywhere, and expose no Ray port outside the
cluster. They also stay hardened: every image pinned by digest (or by a reference to
cluster/images.lock that nothing runs unrendered), every install hash-pinned, every KubeRay pod
and container locked down by its securityContext, Ray's ports admitted by NetworkPolicy only from
the cluster's own pods, a token Secret template that Ray refuses as it stands, and no
world-writable shared directory. The checkers are also run on small hand-made bad configs, so a
checker that stopped seeing a problem fails here too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "launcher" / "aws-gpu.yaml"
KUBERAY = CLUSTER / "kuberay"
DOCKERFILE = CLUSTER / "Dockerfile"
README = CLUSTER / "README.md"
IMAGES_LOCK = CLUSTER / "images.lock"
REQ_LOCK = CLUSTER / "requirements.lock"
REQ_IN = CLUSTER / "requirements.in"
GPU_PRESET = "ray_jobs/configs/ptb-gpu-multinode.yaml"
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard + Jobs API, Ray Client
RAY_UID, RAY_GID = 1000, 100  # the rayproject/ray images' user `ray` and its group `users`


# ----------------------------------------------------------------------------- helpers


def pinned_ray_version() -> str:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the project venv is 3.11
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", d.strip()))]
    assert len(pins) == 1, f"pyproject.toml must pin ray exactly once with ==, found {deps}"
    return pins[0]


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[tuple[str, dict]]:
    return [(f"{p.name}#{i}", d) for p in sorted(KUBERAY.glob("*.yaml")) for i, d in enumerate(load_docs(p))]


def image_ray_version(image: str) -> str | None:
    """The Ray version in an image tag laid out like rayproject/ray's: <x.y.z>[-pyXY][-platform]."""
    m = re.search(r":(\d+\.\d+\.\d+)(?:-|$)", image)
    return m.group(1) if m else None


def image_python_tag(image: str) -> str | None:
    m = re.search(r"-(py3\d+)(?:-|$)", image)
    return m.group(1) if m else None


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """Every pod spec a Kubernetes object creates, labelled for error messages."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    out: list[tuple[str, dict]] = []

    def from_cluster_spec(prefix: str, cs: dict) -> None:
        out.append((f"{prefix}head", cs["headGroupSpec"]["template"]["spec"]))
        for g in cs.get("workerGroupSpecs") or []:
            out.append((f"{prefix}worker group {g['groupName']}", g["template"]["spec"]))

    if kind == "RayCluster":
        from_cluster_spec("", spec)
    elif kind == "RayJob":
        if spec.get("rayClusterSpec"):
            from_cluster_spec("rayClusterSpec ", spec["rayClusterSpec"])
        if spec.get("submitterPodTemplate"):
            out.append(("submitter", spec["submitterPodTemplate"]["spec"]))
    elif kind == "Pod":
        out.append(("pod", spec))
    elif isinstance(spec.get("template"), dict):  # Deployment, Job, StatefulSet, ...
        out.append(("template", spec["template"].get("spec") or {}))
    return out


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("containers") or []) + list(pod_spec.get("initContainers") or [])


def auth_problems(doc: dict, secret_names: set[str]) -> list[str]:
    """What keeps a KubeRay object from running every Ray container with token auth."""
    problems = []
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    cluster_specs = {"RayCluster": [spec], "RayJob": [spec.get("rayClusterSpec")] if spec.get("rayClusterSpec") else []}
    for cs in cluster_specs.get(kind, []):
        mode = (cs.get("authOptions") or {}).get("mode")
        if mode != "token":
            problems.append(f"{kind} authOptions.mode is {mode!r}, not 'token'")
    if kind == "RayJob" and not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        problems.append("RayJob has neither rayClusterSpec nor clusterSelector")
    for where, ps in pod_specs(doc):
        for c in containers(ps):
            env = {e["name"]: e for e in c.get("env") or []}
            mode = env.get("RAY_AUTH_MODE", {}).get("value")
            if mode != "token":
                problems.append(f"{where} container {c['name']}: RAY_AUTH_MODE is {mode!r}")
            ref = ((env.get("RAY_AUTH_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if ref.get("name") not in secret_names or ref.get("key") != "auth_token":
                problems.append(f"{where} container {c['name']}: RAY_AUTH_TOKEN is not read from "
                                f"Secret {sorted(secret_names)} key auth_token (got {ref or 'nothing'})")
    return problems


def exposure_problems(doc: dict) -> list[str]:
    """Ways a Kubernetes object would publish the GCS, dashboard/Jobs API or Ray Client port."""
    problems = []
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "Service" and spec.get("type") in ("LoadBalancer", "NodePort"):
        ports = {p.get("port") for p in spec.get("ports") or []} | {p.get("targetPort") for p in spec.get("ports") or []}
        if ports & RAY_PORTS or not spec.get("ports"):
            problems.append(f"Service {doc['metadata']['name']} of type {spec['type']} exposes {sorted(ports & RAY_PORTS)}")
    if kind in ("Ingress", "Route", "HTTPRoute", "Gateway"):
        problems.append(f"{kind} {doc['metadata']['name']} publishes cluster ports")
    cluster_specs = {"RayCluster": [spec], "RayJob": [spec.get("rayClusterSpec") or {}]}.get(kind, [])
    for cs in cluster_specs:
        head = cs.get("headGroupSpec") or {}
        for stype in (head.get("serviceType"), ((head.get("headService") or {}).get("spec") or {}).get("type")):
            if stype in ("LoadBalancer", "NodePort"):
                problems.append(f"{kind} head service type {stype}")
        if head.get("enableIngress"):
            problems.append(f"{kind} head enableIngress is true")
    return problems


def entrypoint_args(cmd: str) -> tuple[str, str | None, list[str]]:
    """(script, --config path, --set overrides) of `python SCRIPT --config PATH [--set k=v ...]`."""
    argv = shlex.split(cmd)
    assert argv[0].startswith("python"), f"entrypoint does not start with python: {cmd!r}"
    script, config, overrides = argv[1], None, []
    rest = argv[2:]
    for flag, value in zip(rest[::2], rest[1::2]):
        if flag == "--config":
            config = value
        elif flag == "--set":
            overrides.append(value)
    return script, config, overrides


def rayjobs() -> list[dict]:
    return [d for _, d in k8s_docs() if d.get("kind") == "RayJob"]


def secret_names() -> set[str]:
    return {d["metadata"]["name"] for _, d in k8s_docs() if d.get("kind") == "Secret"}


def launcher_commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in cfg.get(k) or []]


def images_tool() -> types.ModuleType:
    """cluster/images.py as a module (executed from source: no __pycache__ lands in cluster/)."""
    path = CLUSTER / "images.py"
    mod = types.ModuleType("cluster_images")
    mod.__file__ = str(path)
    exec(compile(path.read_text(), str(path), "exec"), mod.__dict__)
    return mod


def strip_pin(image: str) -> str:
    """`repository:tag` of `repository:tag@<digest or lock reference>`."""
    return image.split("@", 1)[0]


# ----------------------------------------------------------------------------- parse + schema


def test_every_yaml_parses_and_names_itself():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert LAUNCHER in files and len(files) >= 5, files
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        if path.parent == KUBERAY:
            for d in docs:
                assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), \
                    f"{path}: a Kubernetes object needs apiVersion, kind and metadata.name"


def test_launcher_config_passes_rays_own_schema():
    import importlib.util

    import jsonschema

    # Ray's own schema, found without importing Ray (seconds on a busy machine).
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    cfg = load_docs(LAUNCHER)[0]
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert sum(t.get("max_workers", 0) for t in workers) <= cfg["max_workers"]


# ----------------------------------------------------------------------------- Ray version


def test_images_and_ray_versions_equal_the_pinned_ray():
    from importlib.metadata import version

    pinned = pinned_ray_version()
    assert version("ray") == pinned, f"installed ray {version('ray')} != pyproject pin {pinned}"

    images: list[tuple[str, str]] = []
    cfg = load_docs(LAUNCHER)[0]
    docker = cfg.get("docker") or {}
    images += [(f"launcher docker.{k}", docker[k]) for k in ("image", "head_image", "worker_image") if k in docker]
    for name, t in cfg["available_node_types"].items():
        d = t.get("docker") or {}
        images += [(f"launcher {name}.docker.{k}", d[k]) for k in ("image", "head_image", "worker_image") if k in d]
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.M)
    assert froms, "cluster/Dockerfile has no FROM line"
    images += [("Dockerfile FROM", f) for f in froms]
    for where, doc in k8s_docs():
        for pod, ps in pod_specs(doc):
            images += [(f"{where} {pod} {c['name']}", c["image"]) for c in containers(ps)]
        for cs in (doc.get("spec", {}), doc.get("spec", {}).get("rayClusterSpec") or {}):
            if doc.get("kind") in ("RayCluster", "RayJob") and "rayVersion" in cs:
                assert str(cs["rayVersion"]) == pinned, f"{where} rayVersion {cs['rayVersion']} != {pinned}"
    assert len(images) >= 6, images
    wrong = [(w, i) for w, i in images if image_ray_version(i) != pinned]
    assert not wrong, f"images whose Ray version is not the pinned {pinned}: {wrong}"
    # One Python for every node: pickled functions and checkpoints cross nodes.
    py_tags = {image_python_tag(i) for _, i in images}
    assert len(py_tags) == 1 and None not in py_tags, f"images disagree on Python: {images}"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert py_tags == {py}, f"images use {py_tags}, the project venv {py}"


def test_kuberay_images_come_from_the_dockerfile():
    """The manifests run the image cluster/Dockerfile builds (it installs this package)."""
    base_tag = re.search(r"^FROM\s+\S+?:([^@\s]+)", DOCKERFILE.read_text(), flags=re.M).group(1)
    for where, doc in k8s_docs():
        for pod, ps in pod_specs(doc):
            for c in containers(ps):
                repo, tag = strip_pin(c["image"]).rsplit(":", 1)
                assert repo.endswith("sparsebk-ray") and tag == base_tag, \
                    f"{where} {pod}: image {c['image']} is not sparsebk-ray:{base_tag} built by cluster/Dockerfile"


# ----------------------------------------------------------------------------- named files exist


def test_every_path_named_in_cluster_files_exists():
    texts = {p: p.read_text() for p in sorted(CLUSTER.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}
    named = {(p.name, m) for p, t in texts.items() for m in re.findall(r"(?<![\w/])((?:ray_jobs|sparsebk|cluster|tests)/[\w./-]*\w)", t)}
    assert any(m == "ray_jobs/train.py" for _, m in named) and any(m == GPU_PRESET for _, m in named)
    missing = sorted((f, m) for f, m in named if not (ROOT / m).exists())
    assert not missing, f"paths named in cluster/ that do not exist: {missing}"
    # COPY sources of the image.
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", DOCKERFILE.read_text(), flags=re.M):
        for s in src.split():
            assert (ROOT / s).exists(), f"cluster/Dockerfile copies {s}, which does not exist"


def test_rayjob_entrypoints_name_existing_scripts_and_configs():
    jobs = rayjobs()
    scripts = set()
    for job in jobs:
        script, config, _ = entrypoint_args(job["spec"]["entrypoint"])
        scripts.add(script)
        assert (ROOT / script).is_file(), f"RayJob {job['metadata']['name']}: {script} does not exist"
        assert config and (ROOT / config).is_file(), f"RayJob {job['metadata']['name']}: config {config} does not exist"
        wd = yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}").get("working_dir")
        assert wd == "/home/ray/sparsebk", "working_dir must be the repository copy the Dockerfile makes"
        assert re.search(rf"^WORKDIR\s+{re.escape(wd)}\s*$", DOCKERFILE.read_text(), flags=re.M)
    assert {"ray_jobs/train.py", "ray_jobs/sweep.py"} <= scripts


def test_train_rayjob_config_loads_into_train_config():
    """The training RayJob's config + overrides load into the train helper's TrainConfig."""
    from sparsebk.train.config import load_config

    job = next(j for j in rayjobs() if "ray_jobs/train.py" in j["spec"]["entrypoint"])
    _, config, overrides = entrypoint_args(job["spec"]["entrypoint"])
    assert config == GPU_PRESET
    cfg = load_config(ROOT / config, overrides)
    assert cfg.run.use_gpu is True


# ----------------------------------------------------------------------------- presets fit nodes

GPUS_PER_WORKER = 1  # sparsebk/train/ray_train/driver.py: one Ray Train worker process per GPU


def cpu_quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def launcher_gpu_nodes() -> list[dict]:
    """(name, gpus, cpus, max_nodes) of the launcher's GPU worker node types."""
    cfg = load_docs(LAUNCHER)[0]
    return [dict(where=f"launcher {n}", gpus=t["resources"]["GPU"], cpus=t["resources"]["CPU"],
                 max_nodes=t.get("max_workers", 0))
            for n, t in cfg["available_node_types"].items()
            if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) > 0]


def kuberay_gpu_groups() -> list[dict]:
    out = []
    for where, doc in k8s_docs():
        if doc.get("kind") != "RayCluster":
            continue
        for g in doc["spec"].get("workerGroupSpecs") or []:
            (c,) = [c for c in g["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
            lim = c["resources"]["limits"]
            if int(lim.get("nvidia.com/gpu", 0)) > 0:
                out.append(dict(where=f"{where} group {g['groupName']}", gpus=int(lim["nvidia.com/gpu"]),
                                cpus=cpu_quantity(lim["cpu"]), max_nodes=g["maxReplicas"]))
    return out


def fit_problems(node: dict, workers: int, cpus_per_worker: float) -> list[str]:
    """Why `workers` processes of (cpus_per_worker CPU, 1 GPU) cannot all be placed."""
    per_node = node["gpus"] // GPUS_PER_WORKER
    problems = []
    if cpus_per_worker * per_node > node["cpus"]:
        problems.append(f"{node['where']}: {per_node} workers x {cpus_per_worker} CPU > {node['cpus']} CPUs")
    if per_node * node["max_nodes"] < workers:
        problems.append(f"{node['where']}: {node['max_nodes']} nodes x {per_node} GPU workers < {workers} workers")
    return problems


def test_gpu_preset_fits_every_gpu_node_type():
    """workers x GPUs per worker fits the GPU node types at their autoscaling maximum, with
    each worker's CPUs, and the head takes no training worker (it has no GPU)."""
    from sparsebk.train.config import load_config

    cfg = load_config(ROOT / GPU_PRESET, [])
    assert cfg.run.use_gpu is True and cfg.run.num_workers >= 2
    nodes = launcher_gpu_nodes() + kuberay_gpu_groups()
    assert len(nodes) >= 2, nodes
    for node in nodes:
        assert node["gpus"] >= 2, f"{node['where']} is not a multi-GPU node type"
        assert not fit_problems(node, cfg.run.num_workers, cfg.run.cpus_per_worker)
    head = load_docs(LAUNCHER)[0]
    assert head["available_node_types"][head["head_node_type"]]["resources"].get("GPU") == 0
    # The checker itself: a node type one GPU short, and one short of CPUs, are caught.
    assert fit_problems(dict(where="x", gpus=4, cpus=64, max_nodes=1), 5, 4)
    assert fit_problems(dict(where="y", gpus=4, cpus=15, max_nodes=2), 8, 4)
    assert not fit_problems(dict(where="z", gpus=4, cpus=16, max_nodes=2), 8, 4)


def kuberay_shared_mounts() -> list[tuple[str, list[str]]]:
    """(pod, mount paths of ReadWriteMany claims) for every pod of every RayCluster."""
    pvcs = {d["metadata"]["name"]: d for _, d in k8s_docs() if d.get("kind") == "PersistentVolumeClaim"}
    out = []
    for where, doc in k8s_docs():
        if doc.get("kind") != "RayCluster":
            continue
        for pod, ps in pod_specs(doc):
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in ps.get("volumes") or []
                      if "persistentVolumeClaim" in v}
            (c,) = [c for c in ps["containers"] if c["name"].startswith("ray-")]
            out.append((f"{where} {pod}", [m["mountPath"] for m in c.get("volumeMounts") or []
                                           if m["name"] in claims
                                           and "ReadWriteMany" in pvcs[claims[m["name"]]]["spec"]["accessModes"]]))
    return out


def launcher_shared_mounts() -> list[str]:
    """Container paths bound from a host path that initialization_commands mount over NFS."""
    cfg = load_docs(LAUNCHER)[0]
    init = " ".join(cfg["initialization_commands"])
    binds = [o.split()[1].split(":")[1] for o in cfg["docker"]["run_options"] if o.startswith("-v ")]
    return [b for b in binds if "mount -t nfs4" in init and b in init]


def _under(path: str, mounts: list[str]) -> bool:
    return any(str(path).startswith(m.rstrip("/") + "/") for m in mounts)


def test_gpu_preset_storage_is_shared_by_every_node():
    """Checkpoints, metrics and the dataset of a multi-node run live where every pod/container
    sees the same files: under a ReadWriteMany volume (KubeRay) or the NFS mount (launcher)."""
    from sparsebk.train.config import load_config

    cfg = load_config(ROOT / GPU_PRESET, [])
    paths = {"run.storage_path": cfg.run.storage_path, "data.dir": cfg.data.dir}
    pods = kuberay_shared_mounts()
    assert pods
    for pod, mounts in pods:
        for field, path in paths.items():
            assert _under(path, mounts), f"{pod}: {field}={path} is not under a ReadWriteMany mount {mounts}"
    for field, path in paths.items():
        assert _under(path, launcher_shared_mounts()), f"launcher: {field}={path} is not on the NFS mount"
    assert not _under("/tmp/ray/x", ["/mnt/shared"]) and _under("/mnt/shared/a", ["/mnt/shared/"])


def test_sweep_rayjob_fits_the_gpu_nodes_and_keeps_everything_shared():
    """The sweep RayJob: the file's train_overrides all survive the cluster's override, the
    sweep folder, each trial's data and runs are on the shared volume, and the concurrent
    trials' GPU workers fit the GPU worker group at its maximum."""
    from sparsebk.tune.config import load_sweep_config
    from sparsebk.tune.sweep import max_concurrent, prepare_sweep

    job = next(j for j in rayjobs() if "ray_jobs/sweep.py" in j["spec"]["entrypoint"])
    _, config, overrides = entrypoint_args(job["spec"]["entrypoint"])
    as_written = load_sweep_config(ROOT / config)
    cfg = load_sweep_config(ROOT / config, overrides)
    dropped = [o for o in as_written.train_overrides if o not in cfg.train_overrides]
    assert not dropped, f"the RayJob's train_overrides drop {dropped} from {config}"
    prep = prepare_sweep(cfg, check_data=False)
    paths = {"sweep folder": prep.sweep_dir, "data.dir": prep.base_train["data"]["dir"],
             "run.storage_path": prep.base_train["run"]["storage_path"]}
    for pod, mounts in kuberay_shared_mounts():
        for what, path in paths.items():
            assert _under(path, mounts), f"{pod}: the sweep's {what} {path} is not shared"
    trials = max_concurrent(prep, {})  # the explicit max_concurrent_trials; {}: nothing inferred
    assert prep.use_gpu and trials >= 2
    for node in kuberay_gpu_groups():
        assert not fit_problems(node, trials * prep.num_workers, prep.cpus_per_worker)


# ----------------------------------------------------------------------------- security


def test_token_auth_is_on_for_every_kuberay_container():
    names = secret_names()
    assert names == {"sparsebk-ray-token"}, names
    for where, doc in k8s_docs():
        problems = auth_problems(doc, names)
        assert not problems, f"{where}: {problems}"
    # RayJobs that select an existing cluster rely on that cluster's authOptions.
    clusters = {d["metadata"]["name"]: d for _, d in k8s_docs() if d.get("kind") == "RayCluster"}
    for job in rayjobs():
        sel = (job["spec"].get("clusterSelector") or {}).get("ray.io/cluster")
        if sel is not None:
            assert sel in clusters, f"RayJob {job['metadata']['name']} selects unknown RayCluster {sel}"
            assert clusters[sel]["spec"]["authOptions"] == {"mode": "token", "secretName": "sparsebk-ray-token"}


# What Ray 2.60's C++ AuthenticationTokenLoader strips before deciding there is "no token"
# (src/ray/rpc/authentication/authentication_token_loader.cc, TrimWhitespace): a token that is
# empty after this is refused, any other string is accepted as the cluster's token.
RAY_TOKEN_WHITESPACE = " \t\n\r\f\v"

_RAY_TOKEN_PROBE = """
import os, sys
from ray._raylet import AuthenticationTokenLoader
loader = AuthenticationTokenLoader.instance()
for token in sys.argv[1:]:
    os.environ["RAY_AUTH_TOKEN"] = token
    loader.reset_cache()
    print(loader.has_token(ignore_auth_mode=True))
"""


def ray_accepts_tokens(tokens: list[str], home: Path) -> list[bool]:
    """Whether Ray's own token loader takes each string as a token, given as RAY_AUTH_TOKEN the
    way the manifests pass the Secret (a HOME without ~/.ray/auth_token: nothing to fall back on)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(home)
    out = subprocess.run([sys.executable, "-c", _RAY_TOKEN_PROBE, *tokens], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    answers = out.stdout.split()[-len(tokens):]
    assert set(answers) <= {"True", "False"} and len(answers) == len(tokens), out.stdout
    return [a == "True" for a in answers]


def token_template_problems(secret: dict) -> list[str]:
    """Why a Secret template would work if applied unchanged: a value Ray accepts as a token."""
    token = (secret.get("stringData") or {}).get("auth_token")
    if "data" in secret:
        return ["the template sets `data` (base64): keep the blank value readable in stringData"]
    if not isinstance(token, str):
        return [f"stringData.auth_token is {token!r}, not a string"]
    if token.strip(RAY_TOKEN_WHITESPACE):
        return [f"stringData.auth_token {token!r} is not blank: Ray accepts any non-blank string as the token"]
    return []


def test_token_secret_template_is_unusable_as_it_stands(tmp_path):
    """The committed Secret holds a value Ray refuses (blank), never a placeholder word that would
    become the cluster's token if the file were applied unchanged; the README's command makes a
    real one (256 random bits), which Ray accepts."""
    (path,) = [p for p in KUBERAY.glob("*.yaml") if any(d.get("kind") == "Secret" for d in load_docs(p))]
    assert "template" in path.name, "name the Secret file so nobody mistakes it for a real one"
    (secret,) = [d for d in load_docs(path) if d.get("kind") == "Secret"]
    assert not token_template_problems(secret), token_template_problems(secret)
    readme = README.read_text()
    commands = set(re.findall(r'--from-literal=auth_token="\$\(([^)]*)\)"', readme + path.read_text()))
    assert commands == {"openssl rand -hex 32"}, f"the Secret must be made from a fresh random token: {commands}"
    generated = subprocess.run(shlex.split(commands.pop()), capture_output=True, text=True, check=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", generated), generated
    placeholder = secret["stringData"]["auth_token"]
    assert ray_accepts_tokens([placeholder, generated, "REPLACE-WITH-A-TOKEN"], tmp_path) == [False, True, True], \
        "Ray must refuse the template's value and accept a generated token (and any placeholder word)"
    # The checker itself: a placeholder word, a token, and a base64 `data` value are all seen.
    for bad in ({"stringData": {"auth_token": "REPLACE-ME"}}, {"stringData": {"auth_token": generated}},
                {"data": {"auth_token": "IA=="}}, {"stringData": {}}):
        assert token_template_problems(bad), bad


def test_token_auth_is_on_for_every_launcher_node():
    cfg = load_docs(LAUNCHER)[0]
    run_options = " ".join(cfg["docker"].get("run_options") or [])
    assert "--env RAY_AUTH_MODE=token" in run_options, "every container needs RAY_AUTH_MODE=token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    mounts = cfg["file_mounts"]
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token", "the token must reach every node"


def test_no_ray_port_is_published_outside_the_cluster():
    for where, doc in k8s_docs():
        assert not exposure_problems(doc), f"{where}: {exposure_problems(doc)}"
    clusters = [d for _, d in k8s_docs() if d.get("kind") == "RayCluster"]
    assert clusters and all(d["spec"]["headGroupSpec"].get("serviceType") == "ClusterIP" for d in clusters)
    # Launcher: the dashboard/Jobs API binds loopback; reach it through `ray dashboard` (SSH).
    cfg = load_docs(LAUNCHER)[0]
    starts = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts and "0.0.0.0" not in starts
    readme = README.read_text()
    for needle in ("kubectl port-forward", "ray dashboard", "remote code execution"):
        assert needle in readme, f"cluster/README.md must explain {needle!r}"


def test_checkers_flag_hand_made_bad_configs():
    """The checkers above see each kind of problem on a minimal bad object."""
    lb = {"kind": "Service", "metadata": {"name": "dash"},
          "spec": {"type": "LoadBalancer", "ports": [{"port": 8265}]}}
    np_ = {"kind": "Service", "metadata": {"name": "gcs"},
           "spec": {"type": "NodePort", "ports": [{"port": 80, "targetPort": 6379}]}}
    safe = {"kind": "Service", "metadata": {"name": "web"},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 443, "targetPort": 8443}]}}
    assert exposure_problems(lb) and exposure_problems(np_) and not exposure_problems(safe)

    good_env = [{"name": "RAY_AUTH_MODE", "value": "token"},
                {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "auth_token"}}}]

    def cluster(env, mode="token", service="ClusterIP"):
        pod = {"containers": [{"name": "ray-head", "image": "x:1.0.0", "env": env}]}
        return {"kind": "RayCluster", "metadata": {"name": "c"},
                "spec": {"authOptions": {"mode": mode},
                         "headGroupSpec": {"serviceType": service, "template": {"spec": pod}},
                         "workerGroupSpecs": []}}

    assert not auth_problems(cluster(good_env), {"s"})
    assert auth_problems(cluster(good_env[1:]), {"s"}), "missing RAY_AUTH_MODE not seen"
    assert auth_problems(cluster(good_env[:1]), {"s"}), "missing RAY_AUTH_TOKEN not seen"
    assert auth_problems(cluster(good_env), {"other"}), "token from an unknown Secret not seen"
    assert auth_problems(cluster(good_env, mode="disabled"), {"s"}), "authOptions.mode disabled not seen"
    assert exposure_problems(cluster(good_env, service="NodePort"))
    via_head_service = cluster(good_env)
    via_head_service["spec"]["headGroupSpec"]["headService"] = {"spec": {"type": "LoadBalancer"}}
    assert exposure_problems(via_head_service), "a LoadBalancer headService not seen"
    assert image_ray_version("rayproject/ray:2.59.1-py311-gpu") == "2.59.1"
    assert image_ray_version("rayproject/ray:latest-gpu") is None
    assert entrypoint_args("python a.py --config b.yaml --set x.y=1 --set z=2") == ("a.py", "b.yaml", ["x.y=1", "z=2"])


# ----------------------------------------------------------------------------- pods and setup


def test_ray_pods_have_memory_backed_shm_and_gpu_limits():
    for where, doc in k8s_docs():
        if doc.get("kind") != "RayCluster":
            continue
        for pod, ps in pod_specs(doc):
            vols = {v["name"]: v for v in ps.get("volumes") or []}
            (ray_c,) = [c for c in ps["containers"] if c["name"].startswith("ray-")]
            shm = [m for m in ray_c.get("volumeMounts") or [] if m["mountPath"] == "/dev/shm"]
            assert shm and vols[shm[0]["name"]].get("emptyDir", {}).get("medium") == "Memory", \
                f"{where} {pod}: /dev/shm must be a memory-backed emptyDir"
            if pod.startswith("worker"):
                lim = ray_c["resources"]["limits"]
                assert int(lim.get("nvidia.com/gpu", 0)) >= 2, f"{where} {pod}: multi-GPU limit missing"
                assert lim.get("nvidia.com/gpu") == ray_c["resources"]["requests"].get("nvidia.com/gpu")
            else:
                assert "nvidia.com/gpu" not in (ray_c["resources"].get("limits") or {}), "the head has no GPU"
    cfg = load_docs(LAUNCHER)[0]
    for key in ("head_run_options", "worker_run_options"):
        assert any(o.startswith("--shm-size=") for o in cfg["docker"][key]), f"launcher docker.{key} needs --shm-size"


def test_setup_installs_this_package():
    cfg = load_docs(LAUNCHER)[0]
    mounted = [remote for remote, local in cfg["file_mounts"].items() if local == "."]
    assert mounted, "the launcher must sync the repository to the nodes"
    assert any(f"pip install" in c and mounted[0] in c for c in cfg["setup_commands"]), \
        "launcher setup_commands must pip-install the synced repository"
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY .*pyproject\.toml", text, flags=re.M)
    assert re.search(r"^RUN pip install [^\n]*\s\.\s", text + " ", flags=re.M), "Dockerfile must pip install ."


def test_torch_pin_is_the_same_everywhere():
    """The cluster images install the torch the Makefile installs locally (one tested version):
    the lock (which the Dockerfile and the launcher install) pins it, from requirements.in."""
    pins = {
        "Makefile": re.findall(r"torch==([\w.]+)", (ROOT / "Makefile").read_text()),
        "cluster/requirements.in": re.findall(r"^torch==([\w.]+)", REQ_IN.read_text(), flags=re.M),
        "cluster/requirements.lock": [parse_requirements_lock(REQ_LOCK.read_text())[0]["torch"][0]],
    }
    assert all(pins.values()), f"a torch pin is missing: {pins}"
    assert len({v for vs in pins.values() for v in vs}) == 1, f"torch pins differ: {pins}"
    for where, cmds in (("cluster/Dockerfile", dockerfile_run_commands()),
                        ("launcher setup_commands", load_docs(LAUNCHER)[0]["setup_commands"])):
        assert any("--require-hashes" in c and "requirements.lock" in c for c in cmds), \
            f"{where} must install the hash-pinned lock (which holds torch)"
        assert not any(re.search(r"\btorch[=<>~]", c) for c in cmds), f"{where} installs torch outside the lock"


# ----------------------------------------------------------------------------- images by digest

PIN = re.compile(r"@(?:sha256:[0-9a-f]{64}|images\.lock:[a-z0-9][a-z0-9-]*|\$\{?[A-Z][A-Z0-9_]*_DIGEST\}?)$")


def every_image() -> list[tuple[str, str]]:
    """(where, image) of every image the cluster files name: Kubernetes pod specs and
    autoscalerOptions, the launcher's docker keys, the Dockerfile's FROM lines."""
    tool = images_tool()
    out = [(f"{p.relative_to(CLUSTER)} {w}", i) for p in sorted(CLUSTER.rglob("*.yaml"))
           for d in load_docs(p) for w, i in tool.yaml_images(d)]
    out += [("Dockerfile FROM", r) for r in tool.dockerfile_images(DOCKERFILE.read_text())[0]]
    return out


def filled_lock(tmp_path: Path, registry: str = "registry.example/team") -> Path:
    """A copy of images.lock with a synthetic (all-`a`) digest in every entry and a registry
    prefix for the image the Dockerfile builds: the shape an operator's filled lock has."""
    lock = yaml.safe_load(IMAGES_LOCK.read_text())
    for name, entry in lock.items():
        entry["digest"] = "sha256:" + "a" * 64
        if name == "sparsebk-ray":
            entry["image"] = f"{registry}/{entry['image']}"
    path = tmp_path / "images.lock"
    path.write_text(yaml.safe_dump(lock))
    return path


def test_every_image_is_pinned_by_digest_or_a_lock_reference():
    """No image is pinned by tag alone: each carries a sha256 digest, a reference to an entry of
    cluster/images.lock with the same repository and tag, or (Dockerfile) a required build
    argument that the README fills from that entry."""
    tool = images_tool()
    lock = tool.load_lock(IMAGES_LOCK)
    images = every_image()
    kinds = {w.split()[0] for w, _ in images}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayjob-sweep.yaml",
            "launcher/aws-gpu.yaml", "Dockerfile"} <= kinds, kinds
    unpinned = [(w, i) for w, i in images if not PIN.search(i)]
    assert not unpinned, f"images pinned by tag only: {unpinned}"
    for f in tool.cluster_files():
        assert not tool.file_problems(f, lock), tool.file_problems(f, lock)
    # Every KubeRay container runs the one image cluster/Dockerfile builds, as locked.
    for where, doc in k8s_docs():
        for pod, ps in pod_specs(doc):
            for c in containers(ps):
                assert c["image"].endswith("@images.lock:sparsebk-ray"), f"{where} {pod}: {c['image']}"
    readme = README.read_text()
    for needle in ("python cluster/images.py check", "crane digest", "docker buildx imagetools inspect",
                   "--build-arg RAY_GPU_DIGEST"):
        assert needle in readme, f"cluster/README.md must tell the operator {needle!r}"
    # The checker itself, on hand-made references and files.
    assert tool.reference_problems("rayproject/ray:2.60.0-py311-gpu", lock), "a tag-only image not seen"
    assert tool.reference_problems("rayproject/ray@sha256:" + "a" * 64, lock), "a missing tag not seen"
    assert tool.reference_problems("rayproject/ray:2.60.0-py311-gpu@sha256:abc", lock), "a short digest not seen"
    assert tool.reference_problems("rayproject/ray:2.60.0-py311-gpu@images.lock:nope", lock), "unknown entry"
    assert tool.reference_problems("rayproject/ray:2.59.0-py311-gpu@images.lock:ray-gpu", lock), "tag mismatch"
    assert tool.reference_problems("other/ray:2.60.0-py311-gpu@images.lock:ray-cpu", lock), "image mismatch"
    assert tool.reference_problems("rayproject/ray:2.60.0-py311-gpu@${RAY_GPU_DIGEST}", lock, set()), \
        "an undeclared build argument not seen"
    assert not tool.reference_problems("rayproject/ray:2.60.0-py311-gpu@${RAY_GPU_DIGEST}", lock, {"RAY_GPU_DIGEST"})
    assert not tool.reference_problems("rayproject/ray:2.60.0-py311-gpu@sha256:" + "a" * 64, lock)
    assert tool.split_ref("host:5000/x/y:1.0@sha256:ab") == ("host:5000/x/y", "1.0", "sha256:ab")
    assert tool.split_ref("host:5000/x/y") == ("host:5000/x/y", None, None)
    bad = {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "sparsebk-ray:2.60.0-py311-gpu"}]}}}}
    assert [i for _, i in tool.yaml_images(bad)] == ["sparsebk-ray:2.60.0-py311-gpu"]
    refs, args = tool.dockerfile_images("ARG X_DIGEST\nFROM a/b:1@${X_DIGEST} AS base\nARG LATE_DIGEST\nFROM c:2\n")
    assert refs == ["a/b:1@${X_DIGEST}", "c:2"] and args == {"X_DIGEST"}


def test_images_lock_refuses_missing_digests_and_renders_filled_ones(tmp_path, capsys):
    """images.lock: an empty or malformed digest is refused by `check`, `digest` and `render`
    (no silent fall-back to the tag); a filled lock renders every file to tag@sha256 images,
    with the lock's registry, and the rendered files still parse (the launcher's against Ray's
    schema)."""
    import importlib.util

    import jsonschema

    tool = images_tool()
    committed = tool.load_lock(IMAGES_LOCK)
    assert set(committed) == {"ray-gpu", "ray-cpu", "sparsebk-ray"}, committed
    for name, entry in committed.items():
        # An unfilled entry is refused by name; a filled one must be a well-formed digest.
        problems = tool.lock_problems(committed, [name])
        assert (not entry["digest"] and problems and name in problems[0] and "no digest" in problems[0]) \
            or (tool.DIGEST.fullmatch(entry["digest"]) and not problems), (name, entry, problems)
    unfilled = [n for n, e in committed.items() if not e["digest"]]
    assert tool.main(["check"]) == (1 if unfilled else 0)
    err = capsys.readouterr().err
    assert all(n in err for n in unfilled)

    # Malformed digests: refused by every command, naming the entry.
    bad = tmp_path / "bad.lock"
    bad.write_text(IMAGES_LOCK.read_text().replace('digest: ""', 'digest: "sha256:1234"', 1))
    assert tool.main(["--lock", str(bad), "digest", "ray-gpu"]) == 1
    assert "ray-gpu" in capsys.readouterr().err
    assert tool.main(["--lock", str(bad), "render", str(LAUNCHER)]) == 1
    assert "refusing to render" in capsys.readouterr().err
    assert tool.lock_problems({"x": {"image": "a/b:1", "digest": "sha256:" + "A" * 64}}), "uppercase hex accepted"
    assert tool.lock_problems({"x": {"image": "a/b", "digest": "sha256:" + "a" * 64}}), "a lock image without tag"

    good = filled_lock(tmp_path)
    assert tool.main(["--lock", str(good), "check"]) == 0
    capsys.readouterr()
    assert tool.main(["--lock", str(good), "digest", "ray-gpu"]) == 0
    assert capsys.readouterr().out.strip() == "sha256:" + "a" * 64
    lock = tool.load_lock(good)
    pinned = re.compile(r"[\w./:-]+:[\w.-]+@sha256:[0-9a-f]{64}")
    for path in [LAUNCHER, *sorted(KUBERAY.glob("rayjob-*.yaml")), KUBERAY / "raycluster.yaml"]:
        out = tool.render(path.read_text(), lock)
        assert "images.lock:" not in out
        docs = [d for d in yaml.safe_load_all(out) if d is not None]
        images = [i for d in docs for _, i in tool.yaml_images(d)]
        assert images and all(pinned.fullmatch(i) for i in images), images
        as_written = [i for d in load_docs(path) for _, i in tool.yaml_images(d)]
        assert [tool.split_ref(i)[1] for i in images] == [tool.split_ref(i)[1] for i in as_written], \
            "rendering must keep each image's tag next to its digest"
        if path.parent == KUBERAY:
            assert all(i.startswith("registry.example/team/sparsebk-ray:2.60.0-py311-gpu@sha256:") for i in images)
        else:
            ray_dir = Path(importlib.util.find_spec("ray").origin).parent
            schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
            jsonschema.validate(docs[0], schema)
            assert docs[0]["docker"]["head_image"] == "rayproject/ray:2.60.0-py311-cpu@sha256:" + "a" * 64
    # Only the entries a file uses must be filled: KubeRay files render without the launcher's.
    partial = {**lock, "ray-cpu": {**lock["ray-cpu"], "digest": ""}}
    assert tool.render((KUBERAY / "raycluster.yaml").read_text(), partial)
    with pytest.raises(ValueError, match="ray-cpu"):
        tool.render(LAUNCHER.read_text(), partial)


# ----------------------------------------------------------------------------- hash-pinned installs


def parse_requirements_lock(text: str) -> tuple[dict[str, tuple[str, list[str]]], list[str]]:
    """({canonical name: (version, sha256 hashes)}, problems) of a pip hash lock: every
    requirement must be `name==version` followed by `--hash=sha256:<64 hex>` options only."""
    from packaging.utils import canonicalize_name

    entries, problems = {}, []
    logical = re.sub(r"\\\n", " ", text)
    for line in logical.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not line:
            continue
        head, *opts = line.split()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9._+!-]+)", head)
        if not m:
            problems.append(f"not pinned with ==: {head!r}")
            continue
        hashes = [o.split(":", 1)[1] for o in opts if re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", o)]
        if len(hashes) != len(opts) or not hashes:
            problems.append(f"{head}: needs --hash=sha256:<64 hex> options and nothing else, got {opts}")
        name = canonicalize_name(m.group(1))
        if name in entries:
            problems.append(f"{name} pinned twice")
        entries[name] = (m.group(2), hashes)
    return entries, problems


TARGET_ENV = {  # the image's interpreter and platform (rayproject/ray:*-py311-gpu)
    "python_version": "3.11", "python_full_version": "3.11.0", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "implementation_version": "3.11.0",
    "platform_release": "", "platform_version": "",
}


def lock_requirement_problems(entries: dict, requirements: list[str]) -> list[str]:
    """Requirements (PEP 508 strings) that the lock's pins do not satisfy on the image's platform."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    problems = []
    for spec in requirements:
        r = Requirement(spec)
        if r.marker is not None and not r.marker.evaluate({**TARGET_ENV, "extra": ""}):
            continue
        name = canonicalize_name(r.name)
        if name not in entries:
            problems.append(f"{spec}: not in the lock")
        elif not r.specifier.contains(entries[name][0], prereleases=True):
            problems.append(f"{spec}: the lock pins {entries[name][0]}")
    return problems


def dockerfile_run_commands() -> list[str]:
    """The Dockerfile's RUN commands, continuation lines joined, split at `&&`."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    runs = re.findall(r"^RUN\s+(.*)$", text, flags=re.M)
    return [c.strip() for r in runs for c in r.split("&&")]


def pip_install_problems(command: str) -> list[str]:
    """A `pip install` that could fetch something unpinned: it must install the hash lock
    (--require-hashes -r ...requirements.lock, no build isolation) or only local code with
    --no-index --no-deps --no-build-isolation."""
    problems = []
    for m in re.finditer(r"\bpip3?\s+install\s+([^;&|]*)", command):
        argv = shlex.split(m.group(1))
        opts = {a.split("=")[0] for a in argv if a.startswith("-")}
        targets = [a for i, a in enumerate(argv)
                   if not a.startswith("-") and not (i > 0 and argv[i - 1] in ("-r", "-e", "-c"))]
        if "-r" in argv:
            lock = argv[argv.index("-r") + 1]
            if not lock.endswith("requirements.lock") or not {"--require-hashes", "--no-build-isolation"} <= opts:
                problems.append(f"{command!r}: a requirements install without --require-hashes of the lock")
            if targets:
                problems.append(f"{command!r}: installs {targets} beside the lock")
        else:
            local = [argv[argv.index("-e") + 1]] if "-e" in argv else []
            if not {"--no-index", "--no-deps", "--no-build-isolation"} <= opts or not (targets or local) \
                    or not all(t == "." or t.startswith(("~/", "/", "./")) for t in targets + local):
                problems.append(f"{command!r}: installs from an index without hashes")
    return problems


def test_requirements_lock_pins_every_dependency_with_hashes():
    """cluster/requirements.lock pins pyproject's dependencies, requirements.in and their whole
    dependency tree with sha256 hashes, at versions that satisfy every requirement the installed
    copies of those exact versions declare (checked offline from this venv's metadata)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the project venv is 3.11
        tomllib = pytest.importorskip("tomli")
    text = REQ_LOCK.read_text()
    entries, problems = parse_requirements_lock(text)
    assert not problems, problems
    assert len(entries) > 50, "the lock must hold the whole dependency tree, not just the direct dependencies"
    assert "uv pip compile pyproject.toml cluster/requirements.in --generate-hashes" in text, \
        "the lock's header must say how to regenerate it"
    project_deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    direct = project_deps + [l.split("#")[0].strip() for l in REQ_IN.read_text().splitlines()
                             if l.split("#")[0].strip()]
    assert not lock_requirement_problems(entries, direct), lock_requirement_problems(entries, direct)
    assert entries["ray"][0] == pinned_ray_version()
    # The dependencies (with the extras asked for) of every locked package whose installed copy
    # here is the locked version: each must be in the lock at a version it accepts.
    extras = {canonicalize_name(Requirement(d).name): set(Requirement(d).extras) for d in direct}
    checked, missing = 0, []
    for name, (version, _) in entries.items():
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        checked += 1
        for spec in dist.requires or []:
            r = Requirement(spec)
            wanted = [""] + sorted(extras.get(name, ()))
            if r.marker is None or any(r.marker.evaluate({**TARGET_ENV, "extra": e}) for e in wanted):
                missing += [f"{name} {version} needs {p}" for p in
                            lock_requirement_problems(entries, [str(Requirement(spec)).split(";")[0]])]
    assert checked >= 40, f"only {checked} locked packages are installed here at the locked version"
    assert not missing, missing
    # The checkers themselves.
    assert parse_requirements_lock("torch>=2.3\n")[1], "an unpinned requirement not seen"
    assert parse_requirements_lock("torch==2.13.0\n")[1], "a requirement without hashes not seen"
    assert parse_requirements_lock("torch==2.13.0 \\\n    --hash=sha256:abc\n")[1], "a short hash not seen"
    assert lock_requirement_problems({"torch": ("2.2.0", [])}, ["torch>=2.3"])
    assert lock_requirement_problems({}, ["numpy"])
    assert not lock_requirement_problems({}, ["pywin32; sys_platform == 'win32'"])


def test_every_install_is_hash_pinned():
    """The Dockerfile and the launcher install third-party code only from the hash lock
    (pip refuses a file whose sha256 is not listed, and any unlisted dependency), and this
    package itself without an index; the Dockerfile copies the lock it installs."""
    runs = dockerfile_run_commands()
    installs = [c for c in runs if re.search(r"\bpip3?\s+install\b", c)]
    assert len(installs) == 2, installs
    assert not [p for c in installs for p in pip_install_problems(c)], [p for c in installs for p in pip_install_problems(c)]
    assert re.search(r"^COPY\s+(?:--\S+\s+)*cluster/requirements\.lock\s+/tmp/requirements\.lock$",
                     DOCKERFILE.read_text(), flags=re.M)
    assert any("--require-hashes" in c and "-r /tmp/requirements.lock" in c for c in installs)
    cfg = load_docs(LAUNCHER)[0]
    cmds = launcher_commands(cfg)
    launcher_installs = [c for c in cmds if re.search(r"\bpip3?\s+install\b", c)]
    assert any("--require-hashes" in c and "~/sparsebk/cluster/requirements.lock" in c for c in launcher_installs)
    assert not [p for c in launcher_installs for p in pip_install_problems(c)]
    assert not [c for c in cmds if re.search(r"\b(curl|wget)\b", c)], "no downloads outside pip's hash check"
    # The checker itself.
    for bad in ("pip install torch==2.13.0", "pip install -q 'boto3>=1.26'", "pip install -r requirements.txt",
                "pip install --require-hashes -r x/requirements.lock torch", "pip install -e ~/sparsebk",
                "pip install --no-index --no-deps --no-build-isolation numpy"):
        assert pip_install_problems(bad), bad
    assert not pip_install_problems("pip install --no-cache-dir --require-hashes --no-build-isolation -r a/requirements.lock")
    assert not pip_install_problems("pip install -q --no-index --no-deps --no-build-isolation -e ~/sparsebk")


# ----------------------------------------------------------------------------- pods locked down

POD_SECURITY = {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID,
                      "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "seccompProfile": {"type": "RuntimeDefault"}}
RAY_LOG_VOLUME = "ray-logs"  # KubeRay's name for the /tmp/ray volume it shares with the autoscaler


def container_security_problems(where: str, sc: dict) -> list[str]:
    problems = [f"{where}: securityContext.{k} is {sc.get(k)!r}, not {v!r}"
                for k, v in CONTAINER_SECURITY.items() if sc.get(k) != v]
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []) or caps.get("add"):
        problems.append(f"{where}: capabilities must drop ALL and add none, got {caps}")
    if sc.get("privileged"):
        problems.append(f"{where}: privileged")
    return problems


def security_problems(doc: dict) -> list[str]:
    """What keeps a KubeRay object's pods from running as the image's non-root user with no
    capabilities, no privilege escalation, RuntimeDefault seccomp and a read-only root whose
    writable paths are emptyDirs."""
    problems = []
    spec = doc.get("spec") or {}
    for where, ps in pod_specs(doc):
        sc = ps.get("securityContext") or {}
        problems += [f"{where}: pod securityContext.{k} is {sc.get(k)!r}, not {v!r}"
                     for k, v in POD_SECURITY.items() if sc.get(k) != v]
        vols = {v["name"]: v for v in ps.get("volumes") or []}
        if any("persistentVolumeClaim" in v for v in vols.values()) and sc.get("fsGroup") != RAY_GID:
            problems.append(f"{where}: mounts a shared volume but fsGroup is {sc.get('fsGroup')!r}, not {RAY_GID}")
        if not ps.get("containers"):
            problems.append(f"{where}: no containers")
        for c in containers(ps):
            cw = f"{where} container {c['name']}"
            problems += container_security_problems(cw, c.get("securityContext") or {})
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
            ray_node = doc.get("kind") == "RayCluster" and c["name"].startswith("ray-")
            for path in ["/tmp"] + (["/tmp/ray"] if ray_node else []):
                m = mounts.get(path)
                if m is None or m.get("readOnly") or "emptyDir" not in vols.get(m["name"], {}):
                    problems.append(f"{cw}: {path} must be a writable emptyDir (the root file system is read-only)")
            if ray_node and (mounts.get("/tmp/ray") or {}).get("name") != RAY_LOG_VOLUME:
                problems.append(f"{cw}: name the /tmp/ray volume {RAY_LOG_VOLUME!r} (KubeRay mounts that one "
                                "into the autoscaler sidecar)")
    if doc.get("kind") == "RayCluster" and spec.get("enableInTreeAutoscaling"):
        opts = spec.get("autoscalerOptions") or {}
        problems += container_security_problems("autoscaler sidecar", opts.get("securityContext") or {})
        head_vols = {v["name"]: v for v in spec["headGroupSpec"]["template"]["spec"].get("volumes") or []}
        tmp = [m for m in opts.get("volumeMounts") or [] if m["mountPath"] == "/tmp"]
        if not tmp or "emptyDir" not in head_vols.get(tmp[0]["name"], {}):
            problems.append("autoscaler sidecar: /tmp must be a writable emptyDir of the head pod")
    return problems


def test_every_kuberay_pod_and_container_is_locked_down():
    docs = [(w, d) for w, d in k8s_docs() if d.get("kind") in ("RayCluster", "RayJob")]
    pods = [(w, p) for w, d in docs for p, _ in pod_specs(d)]
    assert len(pods) >= 4, pods  # head, GPU workers, two submitters
    for where, doc in docs:
        assert not security_problems(doc), f"{where}: {security_problems(doc)}"
    # Pods that never talk to the Kubernetes API carry no service account token.
    for where, doc in docs:
        for pod, ps in pod_specs(doc):
            if pod != "head":  # the head's autoscaler sidecar scales worker pods through the API
                assert ps.get("automountServiceAccountToken") is False, f"{where} {pod}"
    # The checker itself: each removed or weakened setting is seen.
    (cluster,) = [d for _, d in docs if d["kind"] == "RayCluster"]
    import copy

    def broken(edit) -> dict:
        d = copy.deepcopy(cluster)
        edit(d)
        return d

    head = lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]  # noqa: E731
    worker_c = lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]  # noqa: E731
    for edit in (lambda d: head(d).pop("securityContext"),
                 lambda d: head(d)["securityContext"].update(runAsUser=0),
                 lambda d: head(d)["securityContext"].pop("fsGroup"),
                 lambda d: worker_c(d).pop("securityContext"),
                 lambda d: worker_c(d)["securityContext"].update(allowPrivilegeEscalation=True),
                 lambda d: worker_c(d)["securityContext"].update(readOnlyRootFilesystem=False),
                 lambda d: worker_c(d)["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
                 lambda d: worker_c(d)["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
                 lambda d: worker_c(d)["securityContext"].update(seccompProfile={"type": "Unconfined"}),
                 lambda d: worker_c(d)["securityContext"].update(privileged=True),
                 lambda d: worker_c(d).update(volumeMounts=[m for m in worker_c(d)["volumeMounts"]
                                                            if m["mountPath"] != "/tmp"]),
                 lambda d: head(d)["containers"][0]["volumeMounts"][2].update(name="scratch"),
                 lambda d: d["spec"]["autoscalerOptions"].pop("securityContext"),
                 lambda d: d["spec"]["autoscalerOptions"].pop("volumeMounts")):
        assert security_problems(broken(edit)), "a weakened securityContext was not seen"


# ----------------------------------------------------------------------------- network policies

HEAD_PORT_PARAMS = {"port": 6379, "dashboard-port": 8265, "ray-client-server-port": 10001}
NODE_PORT_PARAMS = ("object-manager-port", "node-manager-port", "runtime-env-agent-port",
                    "dashboard-agent-grpc-port", "metrics-export-port", "dashboard-agent-listen-port")
EPHEMERAL = (32768, 60999)  # Linux's default ip_local_port_range, per pod network namespace


def network_policies() -> list[dict]:
    return [d for _, d in k8s_docs() if d.get("kind") == "NetworkPolicy"]


def cluster_pods(cluster: dict) -> list[tuple[str, dict, dict]]:
    """(pod, labels KubeRay gives it, rayStartParams) for the head and each worker group."""
    name, spec = cluster["metadata"]["name"], cluster["spec"]
    head = spec["headGroupSpec"]
    out = [("head", {**(head["template"].get("metadata") or {}).get("labels", {}), "ray.io/cluster": name,
                     "ray.io/node-type": "head", "ray.io/group": "headgroup"}, head.get("rayStartParams") or {})]
    for g in spec.get("workerGroupSpecs") or []:
        out.append((f"worker group {g['groupName']}",
                    {**(g["template"].get("metadata") or {}).get("labels", {}), "ray.io/cluster": name,
                     "ray.io/node-type": "worker", "ray.io/group": g["groupName"]}, g.get("rayStartParams") or {}))
    return out


def selects(selector: dict, labels: dict) -> bool:
    return not selector.get("matchExpressions") and \
        all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def rule_ports(rule: dict) -> list[tuple[int, int]]:
    return [(p["port"], p.get("endPort", p["port"])) for p in rule.get("ports") or []]


def admitted(rules: list[dict], lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for r in rules for a, b in rule_ports(r))


def pinned_ports(params: dict, head: bool) -> tuple[list[tuple[int, int]], list[str]]:
    """(port ranges a Ray node listens on, problems): every port must be fixed in rayStartParams,
    none left for Ray to pick at random."""
    problems, ports = [], []
    keys = list(NODE_PORT_PARAMS) + (list(HEAD_PORT_PARAMS) if head else [])
    for k in keys:
        v = str(params.get(k, ""))
        if not v.isdigit():
            problems.append(f"rayStartParams.{k} is not fixed")
        else:
            ports.append((int(v), int(v)))
    lo, hi = str(params.get("min-worker-port", "")), str(params.get("max-worker-port", ""))
    if not (lo.isdigit() and hi.isdigit()):
        problems.append("rayStartParams.min-worker-port/max-worker-port are not fixed")
    else:
        ports.append((int(lo), int(hi)))
    return ports, problems


def network_problems(cluster: dict, policies: list[dict], submitter_labels: list[dict]) -> list[str]:
    """Why the NetworkPolicies would not admit Ray's ports from, and only from, the cluster's own
    pods (plus the Jobs API from the submitters and the KubeRay operator) for every pod."""
    name = cluster["metadata"]["name"]
    dashboard = int((cluster["spec"]["headGroupSpec"].get("rayStartParams") or {}).get("dashboard-port", 8265))
    problems = []
    for pod, labels, params in cluster_pods(cluster):
        mine = [p for p in policies if selects(p["spec"].get("podSelector") or {}, labels)
                and "Ingress" in (p["spec"].get("policyTypes") or [])]
        if not mine:
            problems.append(f"{pod}: no NetworkPolicy with policyTypes Ingress selects it")
        rules = [r for p in mine for r in p["spec"].get("ingress") or []]
        peer_rules = []
        for r in rules:
            peers = r.get("from") or []
            if not peers:
                problems.append(f"{pod}: a rule admits every source")
            if not r.get("ports"):
                problems.append(f"{pod}: a rule admits every port")
            if any(not isinstance(p.get("port"), int) or p.get("protocol", "TCP") != "TCP" for p in r.get("ports") or []):
                problems.append(f"{pod}: ports must be TCP numbers")
            outside = False
            for peer in peers:
                if "ipBlock" in peer:
                    problems.append(f"{pod}: an ipBlock peer {peer['ipBlock']}")
                ns, ps = peer.get("namespaceSelector"), peer.get("podSelector")
                if ns is not None and not ((ns.get("matchLabels") or ns.get("matchExpressions")) and ps
                                           and (ps.get("matchLabels") or ps.get("matchExpressions"))):
                    problems.append(f"{pod}: a peer admits whole namespaces ({peer})")
                own = ns is None and ps is not None and (ps.get("matchLabels") or {}).get("ray.io/cluster") == name
                outside = outside or not own
            if outside:
                if any((a, b) != (dashboard, dashboard) for a, b in rule_ports(r)) or labels["ray.io/node-type"] != "head":
                    problems.append(f"{pod}: a peer outside the cluster reaches {rule_ports(r)}, more than the "
                                    f"head's Jobs API ({dashboard})")
            elif peers:
                peer_rules.append(r)
        ports, pin_problems = pinned_ports(params, labels["ray.io/node-type"] == "head")
        problems += [f"{pod}: {p}" for p in pin_problems]
        for lo, hi in ports:
            if not admitted(peer_rules, lo, hi):
                problems.append(f"{pod}: Ray port(s) {lo}-{hi} not admitted from the cluster's pods")
        if labels["ray.io/node-type"] == "head":
            for sub in submitter_labels:
                if not any(admitted([r], dashboard, dashboard) and any(
                        p.get("namespaceSelector") is None and p.get("podSelector") is not None
                        and selects(p["podSelector"], sub) for p in r.get("from") or []) for r in rules):
                    problems.append(f"head: the RayJob submitter {sub} cannot reach the Jobs API")
    return problems


def test_network_policies_admit_ray_ports_only_from_the_cluster():
    """Every pod of the RayCluster is selected by an ingress NetworkPolicy; every Ray port is
    fixed in rayStartParams and admitted from the cluster's own pods; nothing else reaches any
    port but the head's Jobs API, and that only from the RayJob submitters (by label, same
    namespace) and the KubeRay operator (by pod label, in a namespace labelled for it); the GPU
    workers admit each other on the ephemeral range for torch.distributed and NCCL."""
    policies = network_policies()
    assert len(policies) >= 2, policies
    (cluster,) = [d for _, d in k8s_docs() if d.get("kind") == "RayCluster"]
    submitters = [(j["spec"]["submitterPodTemplate"].get("metadata") or {}).get("labels") or {} for j in rayjobs()]
    assert submitters and all(submitters), "label the RayJob submitter pods so the policy can admit them"
    problems = network_problems(cluster, policies, submitters)
    assert not problems, problems
    # The operator's rule: its pods, in a namespace an administrator labelled.
    operator_peers = [p for pol in policies for r in pol["spec"]["ingress"] for p in r["from"] if "namespaceSelector" in p]
    assert operator_peers and all(p["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
                                  and p["namespaceSelector"]["matchLabels"] == {"sparsebk-kuberay-operator": "true"}
                                  for p in operator_peers), operator_peers
    assert "sparsebk-kuberay-operator=true" in README.read_text()
    # GPU workers: torch.distributed's TCPStore and NCCL/Gloo sockets, between worker pods.
    for pod, labels, _ in cluster_pods(cluster):
        if labels["ray.io/node-type"] == "worker":
            rules = [r for p in policies if selects(p["spec"]["podSelector"], labels) for r in p["spec"]["ingress"]
                     if all(selects(peer.get("podSelector") or {}, {**labels, "ray.io/group": "x"})
                            and "namespaceSelector" not in peer for peer in r["from"])]
            assert admitted(rules, *EPHEMERAL), f"{pod}: training workers cannot reach each other"
    # The checker itself.
    import copy

    def broken(edit) -> list[str]:
        pols = copy.deepcopy(policies)
        cl = copy.deepcopy(cluster)
        edit(pols, cl)
        return network_problems(cl, pols, submitters)

    head_pol = lambda pols: next(p for p in pols if p["spec"]["podSelector"]["matchLabels"].get("ray.io/node-type") == "head")  # noqa: E731
    for edit in (lambda pols, cl: pols.clear(),
                 lambda pols, cl: head_pol(pols)["spec"].update(policyTypes=["Egress"]),
                 lambda pols, cl: head_pol(pols)["spec"]["ingress"][0].pop("from"),
                 lambda pols, cl: head_pol(pols)["spec"]["ingress"][0].pop("ports"),
                 lambda pols, cl: head_pol(pols)["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}),
                 lambda pols, cl: head_pol(pols)["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}}),
                 lambda pols, cl: head_pol(pols)["spec"]["ingress"][1]["ports"].append({"protocol": "TCP", "port": 6379}),
                 lambda pols, cl: head_pol(pols)["spec"]["ingress"][0]["ports"].pop(0),
                 lambda pols, cl: head_pol(pols)["spec"]["ingress"][1]["from"].pop(0),
                 lambda pols, cl: cl["spec"]["headGroupSpec"]["rayStartParams"].pop("node-manager-port"),
                 lambda pols, cl: cl["spec"]["workerGroupSpecs"][0]["rayStartParams"].update({"object-manager-port": "9999"}),
                 lambda pols, cl: cl["spec"]["workerGroupSpecs"][0]["rayStartParams"].pop("max-worker-port")):
        assert broken(edit), "a weakened NetworkPolicy or an unfixed Ray port was not seen"


# ----------------------------------------------------------------------------- shared storage


def world_writable_chmods(text: str) -> list[str]:
    """Every `chmod` in `text` whose mode lets everyone write (o+w, a+w, +w, or an octal mode
    whose last digit has the write bit, such as 1777 or 777)."""
    bad = []
    for m in re.finditer(r"\bchmod\s+(?:-[A-Za-z]+\s+)*(\S+)", text):
        mode = m.group(1).strip("'\"")
        if re.fullmatch(r"[0-7]{3,4}", mode):
            if int(mode[-1]) & 2:
                bad.append(m.group(0))
        else:
            for clause in mode.split(","):
                cm = re.fullmatch(r"([ugoa]*)([-+=])([rwxXst]*)", clause)
                if cm and cm.group(2) in "+=" and "w" in cm.group(3) and (not cm.group(1) or set(cm.group(1)) & {"o", "a"}):
                    bad.append(m.group(0))
    return bad


def test_shared_storage_is_not_world_writable():
    """No cluster file makes anything world-writable; the launcher's NFS mount belongs to root and
    the `ray` user's group (setgid, no access for others), the same group KubeRay's pods run with
    as fsGroup; the README names who is trusted by being able to write there."""
    texts = {p.relative_to(CLUSTER): p.read_text() for p in sorted(CLUSTER.rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".lock"}
    bad = {str(p): world_writable_chmods(t) for p, t in texts.items() if world_writable_chmods(t)}
    assert not bad, f"world-writable modes: {bad}"
    assert not [p for p, t in texts.items() if re.search(r"\b[0-7]?777\b", t)], "a 777 mode is named"
    init = " ".join(load_docs(LAUNCHER)[0]["initialization_commands"])
    assert f"chown root:{RAY_GID} /mnt/shared" in init and "chmod 2770 /mnt/shared" in init, init
    assert init.index("mount -t nfs4") < init.index("chmod 2770"), "set the mode on the mounted file system"
    (cluster,) = [d for _, d in k8s_docs() if d.get("kind") == "RayCluster"]
    for pod, ps in pod_specs(cluster):
        assert ps["securityContext"]["fsGroup"] == RAY_GID, pod
    readme = README.read_text()
    for needle in ("Trust boundary", "pickle", "2770", "sha256"):
        assert needle in readme, f"cluster/README.md must explain the shared storage's trust boundary ({needle!r})"
    # The checker itself.
    for cmd in ("sudo chmod 1777 /mnt/shared", "chmod 777 x", "chmod -R a+w x", "chmod o+rw x", "chmod +w x",
                "chmod 0666 f", "chmod u+w,o=rwx d"):
        assert world_writable_chmods(cmd), cmd
    for cmd in ("chmod 2770 /mnt/shared", "chmod 600 ~/.ray/auth_token", "chmod u+w x", "chmod g+w d", "chmod o-w d"):
        assert not world_writable_chmods(cmd), cmd
