"""The cluster configs stay true: they parse, pin the project's Ray, name files that exist, fit
the GPU presets, keep token authentication on everywhere, and expose no Ray port outside the
cluster. The checkers are also run on small hand-made bad configs, so a checker that stopped
seeing a problem fails here too.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "launcher" / "aws-gpu.yaml"
KUBERAY = CLUSTER / "kuberay"
DOCKERFILE = CLUSTER / "Dockerfile"
README = CLUSTER / "README.md"
GPU_PRESET = "ray_jobs/configs/ptb-gpu-multinode.yaml"
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard + Jobs API, Ray Client


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
    base_tag = re.search(r"^FROM\s+\S+:(\S+)", DOCKERFILE.read_text(), flags=re.M).group(1)
    for where, doc in k8s_docs():
        for pod, ps in pod_specs(doc):
            for c in containers(ps):
                repo, tag = c["image"].rsplit(":", 1)
                assert repo.endswith("sparsebk-ray") and tag == base_tag, \
                    f"{where} {pod}: image {c['image']} is not sparsebk-ray:{base_tag} built by cluster/Dockerfile"


# ----------------------------------------------------------------------------- named files exist


def test_every_path_named_in_cluster_files_exists():
    texts = {p: p.read_text() for p in sorted(CLUSTER.rglob("*")) if p.is_file()}
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


def test_token_secret_is_a_template_not_a_token():
    (secret,) = [d for _, d in k8s_docs() if d.get("kind") == "Secret"]
    token = secret["stringData"]["auth_token"]
    assert "REPLACE" in token, "the committed Secret must hold a placeholder, never a real token"
    (path,) = [p for p in KUBERAY.glob("*.yaml") if any(d.get("kind") == "Secret" for d in load_docs(p))]
    assert "template" in path.name, "name the Secret file so nobody mistakes it for a real one"


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
    """The cluster images install the torch the Makefile installs locally (one tested version)."""
    pins = {
        "Makefile": re.findall(r"torch==([\w.]+)", (ROOT / "Makefile").read_text()),
        "cluster/Dockerfile": re.findall(r"torch==([\w.]+)", DOCKERFILE.read_text()),
        "launcher setup_commands": re.findall(r"torch==([\w.]+)", " ".join(load_docs(LAUNCHER)[0]["setup_commands"])),
    }
    assert all(pins.values()), f"a torch pin is missing: {pins}"
    assert len({v for vs in pins.values() for v in vs}) == 1, f"torch pins differ: {pins}"
