"""Running on a cluster: cluster.yaml (Ray cluster launcher), deploy/ (KubeRay) and jobs/pipeline.py (ray job submit).

The launch files are checked offline against real schemas: Ray's own ray-schema.json and the config preparation
`ray up` does before it calls AWS; KubeRay's RayJob CRD (vendored in tests/schemas/); Kubernetes' schemas (the
kubernetes-validate package). Then for what no schema knows: the commands they run name scripts, configs and options
that exist, the install follows the README, the paths every node needs lie on shared storage, and the hardware fits
configs/llama3_8b.yaml. jobs/pipeline.py is run for real through `ray job submit` on a local Ray cluster.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from musicray.cli import build_parser
from musicray.pipeline import DEMO_SONGS, preset_config
from musicray.run import RunDir
from musicray.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "deploy" / "rayjob.yaml"
STORAGE = ROOT / "deploy" / "storage.yaml"
CRD = ROOT / "tests" / "schemas" / "kuberay_rayjob_v1.yaml"
K8S_VERSION = "1.30"
# AWS's published instance specs: vCPUs, GPUs, memory per GPU (GB). Ray takes a node type's `resources` on trust,
# so they must say what the instance has.
INSTANCE_TYPES = {
    "m6i.2xlarge": (8, 0, 0),
    "r6i.8xlarge": (32, 0, 0),
    "g5.12xlarge": (48, 4, 24),
    "g5.48xlarge": (192, 8, 24),
    "p4d.24xlarge": (96, 8, 40),
    "p4de.24xlarge": (96, 8, 80),
    "p5.48xlarge": (192, 8, 80),
}
# configs/llama3_8b.yaml's header: "One node of 8 x 80 GB GPUs".
GPU_MEMORY_8B_GB = 80


def readme_torch_pin() -> str:
    first = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("python3 -m venv"))
    return re.search(r"pip install (torch==\S+)", first).group(1)


def header(path: Path) -> list[str]:
    """The leading comment block of a YAML file, without the '#'."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def pipeline_command(argv: list[str], cwd: Path = ROOT):
    """Parse `jobs/pipeline.py ARGS` with musicray's own parser; returns the args and the config they load."""
    assert (ROOT / argv[0]).is_file() and argv[0] == "jobs/pipeline.py", argv
    args = build_parser().parse_args(["pipeline", *argv[1:]])
    config_path = cwd / args.config if args.config else preset_config(args.preset)
    assert config_path.is_file(), config_path
    return args, load_config(config_path, args.set)


def under(path: str | Path, root: str) -> bool:
    return Path(path).is_absolute() and Path(path).is_relative_to(root)


# -- cluster.yaml ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_rays_own_validation(cluster):
    from ray.autoscaler._private.util import check_legacy_fields, prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)             # the file as written: no unknown or mistyped field
    prepared = prepare_config(copy.deepcopy(cluster))  # what `ray up` does before it talks to AWS
    validate_config(prepared)
    check_legacy_fields(prepared)                    # the AWS bootstrap's first, offline step
    # The head's autoscaler launches workers with boto3: AWS's default head_setup_commands install it, so this
    # file must not replace them without doing the same.
    assert any("boto3" in command for command in prepared["head_setup_commands"])
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["resource"] = broken["available_node_types"]["gpu_worker"].pop(
        "resources")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_cluster_yaml_header_has_the_commands_and_they_run_what_exists(cluster):
    text = "\n".join(header(CLUSTER))
    assert header(CLUSTER)[0].startswith("ray up --no-config-cache cluster.yaml")
    assert "ray down cluster.yaml" in text
    submits = [line for line in header(CLUSTER) if "ray job submit" in line]
    assert len(submits) >= 2
    for line in submits:
        argv = shlex.split(line.split(" -- ", 1)[1])
        assert argv[0] == "python"
        args, config = pipeline_command(argv[1:])
        # Every node reads and writes these: they must be on the shared /data.
        assert under(args.out, "/data") and under(config.cache_dir, "/data")
        if config.base_model != "tiny":
            assert under(config.base_model, "/data")
        assert "--working-dir ." in line and "RAY_AUTH_MODE=token" in line


def test_cluster_yaml_is_sized_for_the_8b_config(cluster):
    types = cluster["available_node_types"]
    for name, node_type in types.items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in INSTANCE_TYPES, f"{name}: add {instance}'s specs to INSTANCE_TYPES"
        cpus, gpus, _ = INSTANCE_TYPES[instance]
        assert node_type["resources"].get("CPU") == cpus and node_type["resources"].get("GPU", 0) == gpus, name
    head = types[cluster["head_node_type"]]
    assert head["resources"]["GPU"] == 0          # drivers and the Serve ingress do not hold a GPU
    workers = [t for name, t in types.items() if name != cluster["head_node_type"] and t["resources"].get("GPU")]
    assert len(workers) == 1
    worker = workers[0]
    _, gpus, gpu_memory = INSTANCE_TYPES[worker["node_config"]["InstanceType"]]
    assert gpu_memory >= GPU_MEMORY_8B_GB
    big = load_config(ROOT / "configs" / "llama3_8b.yaml")
    s1, s2 = big.stage1, big.stage2
    assert s1.use_gpu
    # Stage 1 on one node (ZeRO-3 across nodes would go over the network): every worker's GPU and CPUs fit.
    assert worker["resources"]["GPU"] >= s1.num_workers
    assert worker["resources"]["CPU"] >= s1.num_workers * s1.cpus_per_worker
    max_nodes = min(worker["max_workers"], cluster["max_workers"])
    assert max_nodes * worker["resources"]["GPU"] >= s2.max_concurrent_trials * s2.gpus_per_trial
    assert max_nodes * worker["resources"]["CPU"] >= s2.max_concurrent_trials * s2.cpus_per_trial


def test_cluster_yaml_installs_and_mounts_what_the_jobs_need(cluster, monkeypatch):
    from ray.autoscaler._private.docker import docker_start_cmds

    image = cluster["docker"]["image"]
    version = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", image).group(1)
    assert version == ray.__version__              # `ray up` and the cluster's Ray must match
    # As the README installs: torch first, then musicray without build isolation, in the repository mount.
    setup = " && ".join(cluster["setup_commands"])
    torch_at, musicray_at = setup.index(f"pip install {readme_torch_pin()}"), setup.index(
        "pip install --no-build-isolation -e .")
    assert torch_at < musicray_at
    mounts = cluster["file_mounts"]
    repo = next(remote for remote, local in mounts.items() if (ROOT / local).resolve() == ROOT)
    assert f"cd {repo.replace('/home/ray', '~')} " in setup
    assert ".gitignore" in cluster["rsync_filter"]  # the repository mount leaves .venv and runs/ behind
    assert {".venv/", "runs/"} <= set((ROOT / ".gitignore").read_text().split())
    monkeypatch.delenv("POP909_DIR", raising=False)
    from musicray.data.pop909 import default_pop909_dir

    data = next(remote for remote, local in mounts.items()
                if (ROOT / local).resolve() == default_pop909_dir().resolve())
    assert mounts["/home/ray/.ray"] == "~/.ray"    # the token of `ray get-auth-token --generate`

    # Ray's own rendering of the container start: the env and the shared /data reach every container.
    run = shlex.split(docker_start_cmds("ubuntu", image, mounts, "musicray", cluster["docker"]["run_options"],
                                        cluster["cluster_name"], "/home/ray", "docker"))
    env = {run[i + 1].split("=", 1)[0]: run[i + 1].split("=", 1)[1] for i, arg in enumerate(run) if arg == "--env"}
    assert env["POP909_DIR"] == data and env["RAY_AUTH_MODE"] == "token"
    assert "/data:/data" in [run[i + 1] for i, arg in enumerate(run) if arg == "--volume"]
    assert any(arg.endswith(f":{data}") for arg in run)
    mount = " ".join(cluster["initialization_commands"])
    assert re.search(r"mount -t nfs4 .* \S+:/ /data\b", mount) and "mountpoint -q /data" in mount
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start   # reached through `ray dashboard`'s SSH tunnel only


# -- deploy/ (KubeRay) -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


@pytest.fixture(scope="module")
def crd() -> dict:
    return yaml.safe_load(CRD.read_text())


def crd_schema(crd: dict, version: str) -> dict:
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def strict(schema: dict) -> dict:
    """Reject unknown fields where the schema lists its properties, as `kubectl apply` does (--validate=strict):
    the API server would otherwise drop a misspelt field silently."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def marked(schema: dict, key: str, path: tuple = ()) -> list[tuple]:
    """Paths (property names, '*' for array items) of the schema nodes carrying ``key``."""
    found = [path] if schema.get(key) else []
    for name, sub in schema.get("properties", {}).items():
        found += marked(sub, key, path + (name,))
    if "items" in schema:
        found += marked(schema["items"], key, path + ("*",))
    return found


def at(doc, path: tuple) -> list:
    """The values at ``path`` in ``doc`` ('*': every item)."""
    if not path:
        return [doc]
    head, rest = path[0], path[1:]
    if head == "*":
        return [v for item in doc for v in at(item, rest)]
    return at(doc[head], rest) if isinstance(doc, dict) and head in doc else []


def kubernetes_validator(definition: str):
    """A validator for one of Kubernetes' own (strict) definitions, e.g. podtemplatespec-v1."""
    from referencing import Registry, Resource

    base = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"
    schema = json.loads((base / f"{definition}.json").read_text())
    definitions = json.loads((base / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_rayjob_matches_the_kuberay_crd(rayjob, crd):
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    assert rayjob["apiVersion"] == f"{group}/v1" and rayjob["kind"] == kind
    schema = strict(crd_schema(crd, "v1"))
    jsonschema.Draft7Validator(schema).validate(rayjob)
    kubernetes_validator("objectmeta-meta-v1").validate(rayjob["metadata"])
    # The check catches what the API server would drop: a misspelt field, here and inside a worker group.
    for field_path, wrong in ((("spec",), "shutdownAfterJobFinish"),
                              (("spec", "rayClusterSpec", "workerGroupSpecs", 0), "minReplica")):
        broken = copy.deepcopy(rayjob)
        node = broken
        for part in field_path:
            node = node[part]
        node[wrong] = 1
        with pytest.raises(jsonschema.ValidationError, match=wrong):
            jsonschema.Draft7Validator(schema).validate(broken)


def test_rayjob_pod_templates_match_kubernetes_schema(rayjob, crd):
    paths = marked(crd_schema(crd, "v1"), "x-musicray-pod-template")
    assert len(paths) == 3                           # head, worker groups, submitter: none escapes validation
    validator = kubernetes_validator("podtemplatespec-v1")
    templates = [t for path in paths for t in at(rayjob, path)]
    assert len(templates) == 1 + len(rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    for template in templates:
        validator.validate(template)
    broken = copy.deepcopy(templates[0])
    broken["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_storage_manifests_match_kubernetes_schema(rayjob):
    import kubernetes_validate

    docs = [doc for doc in yaml.safe_load_all(STORAGE.read_text()) if doc]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    claim = next(doc for doc in docs if doc["kind"] == "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]   # several pods write one run dir
    for pod in pod_specs(rayjob) + [doc["spec"] for doc in docs if doc["kind"] == "Pod"]:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {claim["metadata"]["name"]}
    assert header(STORAGE)[0].startswith("kubectl apply -f deploy/storage.yaml")


def pod_specs(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"]
                                                             for g in cluster["workerGroupSpecs"]]


def entrypoint(rayjob: dict) -> tuple[str, list[str]]:
    """`cd DIR && python jobs/pipeline.py ARGS` -> DIR, [jobs/pipeline.py, ARGS...]"""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] == "cd" and argv[2] == "&&" and argv[3] == "python", argv
    return argv[1], argv[4:]


def test_rayjob_runs_the_pipeline_on_what_the_pods_hold(rayjob):
    assert header(RAYJOB)[0].startswith("kubectl apply -f deploy/rayjob.yaml")
    workdir, argv = entrypoint(rayjob)
    args, config = pipeline_command(argv)
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    from ray.runtime_env import RuntimeEnv

    assert set(runtime_env) <= set(RuntimeEnv.known_fields)
    RuntimeEnv(**runtime_env)                        # Ray's own checks of each field
    # Each pod copies the code off the volume to workdir; the job's runtime env installs musicray from there.
    assert runtime_env["pip"]["packages"] == [f"-e {workdir}"]
    assert "--no-build-isolation" in runtime_env["pip"]["pip_install_options"]
    shared = runtime_env["env_vars"]["POP909_DIR"], args.out, config.cache_dir, config.base_model
    for pod in pod_specs(rayjob):
        container = pod["containers"][0]
        command = " ".join(container["command"] + container.get("args", []))
        source = re.search(r"cp -rT (\S+) (\S+)", command)
        assert source and source.group(2) == workdir
        assert command.index("cp -rT") < command.index(f"pip install --no-cache-dir {readme_torch_pin()}")
        volume = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "musicray-data")
        assert all(under(path, volume) for path in (source.group(1), *shared)), shared
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True and rayjob["spec"]["ttlSecondsAfterFinished"] > 0


def test_rayjob_image_and_gpus_fit_ray_and_the_config(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    major_minor = ".".join(ray.__version__.split(".")[:2])
    assert cluster["rayVersion"].startswith(major_minor + ".")
    for pod in pod_specs(rayjob):
        version = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", pod["containers"][0]["image"]).group(1)
        assert version == cluster["rayVersion"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head.get("limits", {})
    _, config = pipeline_command(entrypoint(rayjob)[1])
    s1, s2 = config.stage1, config.stage2
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        pod_gpus = int(limits.get("nvidia.com/gpu", 0))
        assert pod_gpus, f"worker group {group['groupName']}: no nvidia.com/gpu limit"
        # Each Ray Train worker / trial is one GPU with its CPUs, on the same pod.
        assert float(limits["cpu"]) >= pod_gpus * max(s1.cpus_per_worker, s2.cpus_per_trial)
        gpus += pod_gpus * group["replicas"]
    assert s1.use_gpu and gpus >= s1.num_workers and gpus >= s2.max_concurrent_trials * s2.gpus_per_trial


# -- jobs/pipeline.py ------------------------------------------------------------------------------------------
def run_job_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/pipeline.py", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, env={**os.environ, **(env or {})}, timeout=300)


def test_pipeline_job_has_the_options_of_musicray_pipeline():
    job = run_job_script("--help")
    assert job.returncode == 0
    command = subprocess.run([sys.executable, "-m", "musicray.cli", "pipeline", "--help"], cwd=ROOT,
                             capture_output=True, text=True, check=False, timeout=300)
    options = [set(re.findall(r"--[a-z][-a-z]*", out.stdout)) for out in (job, command)]
    assert options[0] == options[1] and {"--preset", "--config", "--out", "--set"} <= options[0]


def test_pipeline_job_wants_an_absolute_out_under_ray_job_submit(tmp_path):
    job = run_job_script("--preset", "tiny", "--out", "runs/x", env={"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"})
    assert job.returncode == 2 and "--out runs/x" in job.stderr and "absolute" in job.stderr
    assert not (ROOT / "runs" / "x").exists()
    # Outside a Ray job a relative --out is fine; this one stops on the preset instead.
    plain = run_job_script("--preset", "nope", "--out", "runs/x", env={"RAY_JOB_CONFIG_JSON_ENV_VAR": ""})
    assert plain.returncode == 2 and "--preset" in plain.stderr and "--out" not in plain.stderr


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# In a fresh process: this one's Ray config has settled on no token auth.
JOB_INFO = """
import json, sys
from ray.job_submission import JobSubmissionClient
(job,) = JobSubmissionClient(sys.argv[1]).list_jobs()
print(json.dumps({"status": job.status.value, "driver": job.driver_info is not None, "runtime_env": job.runtime_env}))
"""


@pytest.mark.slow
def test_pipeline_job_runs_through_ray_job_submit(tmp_path):
    """`ray job submit --working-dir .` to a running cluster with token auth: the driver joins that cluster."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    port, dashboard, agent, client = free_ports(4)
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    log = (tmp_path / "head.log").open("w")
    # Ray's socket paths must stay under 108 bytes: pytest's tmp_path is too deep for its temp dir.
    ray_tmp = tempfile.TemporaryDirectory(prefix="mr-", ignore_cleanup_errors=True)
    # --block keeps the head's processes under this one, so that stopping it stops only this cluster.
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--num-cpus=2", f"--port={port}", f"--dashboard-port={dashboard}",
         "--include-dashboard=true", f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         f"--temp-dir={ray_tmp.name}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    run = tmp_path / "run"
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([ray_cli, "job", "list", "--address", address], env=env, capture_output=True,
                             check=False, timeout=120).returncode != 0:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the head's dashboard did not come up"
            time.sleep(2)
        sets = ["cache_dir=" + str(tmp_path / "cache"), "data.songs=16", "stage1.max_steps=4",
                "stage1.checkpoint_every=2", "stage2.trials_per_subtask=1", "stage2.max_steps=2",
                "stage2.eval_every=1", "stage2.eval_batches=1", "eval.songs=2", "eval.max_examples=8",
                "eval.mask_loss_ablation=false"]
        submit = subprocess.run(
            [ray_cli, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
             sys.executable, "jobs/pipeline.py", "--preset", "tiny", "--out", str(run), "--quiet",
             *[arg for value in sets for arg in ("--set", value)]],
            env=env, capture_output=True, text=True, check=False, timeout=1200)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
        info = subprocess.run([sys.executable, "-c", JOB_INFO, address], env=env, capture_output=True, text=True,
                              check=False, timeout=120)
        job = json.loads(info.stdout.strip().splitlines()[-1])
        assert job["status"] == "SUCCEEDED"
        assert job["driver"]                          # the driver registered with this cluster, not a local one
        assert job["runtime_env"]["working_dir"].startswith("gcs://")
    finally:
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        log.close()
        ray_tmp.cleanup()
    summary = json.loads(RunDir(run).pipeline_json.read_text())
    skipped = [name for name, stage in summary["stages"].items() if stage["skipped"]]
    assert summary["run_dir"] == str(run)
    assert skipped == ["ablation: stage 1 with stage1.mask_loss=true"]  # eval.mask_loss_ablation=false above
    assert len(list(RunDir(run).songs.glob("*.mid"))) == len(DEMO_SONGS)
    assert RunDir(run).eval_report.exists()
    assert (RunDir(run).stage1_model / "config.json").exists() and RunDir(run).trials_csv.exists()
