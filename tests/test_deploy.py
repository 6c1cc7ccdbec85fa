"""deploy/ cannot run here (no Docker engine), so check that it is consistent with the code:
valid compose YAML, CLI flags and environment variables that exist, files that exist."""
import base64
import copy
import dataclasses
import json
import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from kvstore.config import config_from_args
from services.blockstore.server import BlockStoreConfig, build_parser
from services.cli import main as cli
from services.cli.serve import ServeConfig, Service

ROOT = Path(__file__).resolve().parents[1]


def _interpolate(arg: str) -> str:
    """Compose's ${VAR:-default} -> default and ${VAR:?message} / ${VAR} -> a sample value."""
    return re.sub(r"\$\{[A-Z_]+(?::([-?])([^}]*))?\}", lambda m: m[2] if m[1] == "-" else "x", arg)


def test_compose_file_is_valid_and_matches_the_cli():
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    core = {name for name, svc in compose["services"].items() if "profiles" not in svc}
    assert core == {"redis-sessions", "redis-blocks", "blockstore", "sessions"}
    # Sessions are never evicted and survive a crash; blocks are a cache.
    sessions_redis = compose["services"]["redis-sessions"]["command"][-1]
    assert "--maxmemory-policy noeviction" in sessions_redis and "--appendonly yes" in sessions_redis
    assert "--maxmemory-policy allkeys-lru" in compose["services"]["redis-blocks"]["command"][-1]
    for name in ("redis-sessions", "redis-blocks"):  # the password on stdin, not the command line
        assert "redis-server - " in compose["services"][name]["command"][-1]
        assert "requirepass $$REDIS_PASSWORD\n" in compose["services"][name]["command"][-1]
    store = compose["services"]["blockstore"]
    assert store["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / store["build"]["dockerfile"]).exists()
    assert store["command"][:2] == ["blockstore", "serve"]
    # The real parsers: an unknown or misspelt flag fails here (SystemExit / _UsageError).
    args = build_parser(BlockStoreConfig()).parse_args([_interpolate(a) for a in store["command"][2:]])
    config = config_from_args(BlockStoreConfig, args)
    assert (config.host, config.port) == ("0.0.0.0", 50051)
    fields = {f.name.upper() for f in dataclasses.fields(BlockStoreConfig)}
    for var in store["environment"]:
        assert var.startswith("KVSTORE_BLOCKSTORE_") and var.removeprefix("KVSTORE_BLOCKSTORE_") in fields, var
    assert store["environment"]["KVSTORE_BLOCKSTORE_REDIS_URL"].endswith("@redis-blocks:6379/0")
    assert compose["services"]["blockstore"]["depends_on"]["redis-blocks"]["condition"] == "service_healthy"
    sessions = compose["services"]["sessions"]
    assert sessions["command"][0] == "serve" and sessions["image"] == store["image"]
    args = cli.build_parser().parse_args([_interpolate(a) for a in sessions["command"]])
    serve = config_from_args(ServeConfig, args)
    assert (serve.session.blockstore_address, serve.model) == ("blockstore:50051", "small")
    for var in sessions["environment"]:  # KVSTORE_SERVE_<FIELD> sets what --<field> does
        assert var.startswith("KVSTORE_SERVE_"), var
        cli.build_parser().parse_args(["serve", "--" + var.removeprefix("KVSTORE_SERVE_").lower().replace("_", "-"), "x"])
    assert sessions["environment"]["KVSTORE_SERVE_REDIS_URL"].endswith("@redis-sessions:6379/0")
    for service in (store, sessions):  # secrets only in the environment: a command line is public
        assert not [a for a in service["command"] if re.search("TOKEN|KEYS|PASSWORD|redis://", a)], service["command"]


def test_dockerfile_copies_what_exists():
    for src in re.findall(r"^COPY (\S+)", (ROOT / "deploy/Dockerfile").read_text(), re.M):
        assert (ROOT / src).exists(), src


def test_example_config_file_passes_config_check_and_shows_the_defaults(capsys):
    from kvstore.config import from_env, from_toml

    path = ROOT / "deploy/kvstore.toml"
    assert cli.main(["config", "check", str(path)]) == 0, capsys.readouterr().err
    settings = from_toml(ServeConfig, str(path))
    assert len(settings) >= 15 and from_env(ServeConfig, env={}, base=settings) == ServeConfig()



@pytest.mark.parametrize("old, new, message", [
    ("t0_blocks = 1024", "t0_block = 1024", "cache.t0_block: no such setting (did you mean t0_blocks?)"),
    ("workers = 2", 'workers = "two"', "workers must be an integer, got 'two'"),
    ('codec = "lz4"', 'codec = "zstd"', "CacheConfig.codec: unknown codec 'zstd'"),
])
def test_config_check_rejects_a_broken_example_config_naming_the_setting(tmp_path, capsys, old, new, message):
    text = (ROOT / "deploy/kvstore.toml").read_text()
    assert old in text
    path = tmp_path / "kvstore.toml"
    path.write_text(text.replace(old, new, 1))
    assert cli.main(["config", "check", str(path)]) == 2
    assert message in capsys.readouterr().err

def _exported_series() -> set[str]:
    """Every series name the session service (with its workers' collector) and the block store export."""
    from prometheus_client import CollectorRegistry

    from services.blockstore.metrics import Metrics as BlockStoreMetrics
    from services.session.metrics import SessionMetrics, WorkerCollector

    workers = CollectorRegistry()
    workers.register(WorkerCollector(dict))
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    return {m.name + suffix for registry in (SessionMetrics().registry, BlockStoreMetrics().registry, workers)
            for m in registry.collect() for suffix in suffixes[m.type]}


def test_monitoring_profile_scrapes_both_services_and_the_dashboard_uses_only_exported_series():
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    assert {n for n, svc in compose["services"].items() if svc.get("profiles") == ["monitoring"]} == \
        {"prometheus", "grafana"}
    for service in compose["services"].values():  # every mounted file exists
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert not source.startswith(".") or (ROOT / "deploy" / source).exists(), source
    scrape = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    ports = {name: [p.rsplit(":", 1)[-1] for p in svc.get("ports", [])] for name, svc in compose["services"].items()}
    assert targets == {"sessions:9200", "blockstore:9100"}
    assert all(t.split(":")[1] in ports[t.split(":")[0]] for t in targets)
    assert "--metrics-port" in compose["services"]["sessions"]["command"]
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/kvstore.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b(kvstore_[a-z0-9_]+)", e)}
    assert len(dashboard["panels"]) >= 10 and used, used
    assert used <= _exported_series(), used - _exported_series()
    assert {"kvstore_worker_reused_tokens_total", "kvstore_session_ttft_seconds_bucket", "kvstore_worker_load_seconds_bucket",
            "kvstore_worker_step_seconds_bucket", "kvstore_worker_generated_tokens_total"} <= used


# -- the Dockerfile's device argument -------------------------------------------------------------

def _dockerfile_args() -> dict[str, str]:
    text = (ROOT / "deploy/Dockerfile").read_text()
    return {m[1]: m[2].strip('"') for m in re.finditer(r"^ARG (\w+)=(.*)$", text, re.MULTILINE)}


def _torch_install(tmp_path: Path, **build_args: str) -> subprocess.CompletedProcess:
    """The Dockerfile's torch RUN step under sh, as `docker build --build-arg` would run it (ARGs
    are its environment), with a `pip` that records its arguments instead of installing."""
    text = (ROOT / "deploy/Dockerfile").read_text().replace("\\\n", " ")
    [run] = [line.removeprefix("RUN ") for line in text.splitlines() if line.startswith("RUN ") and "torch==" in line]
    (tmp_path / "pip").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$PIP_ARGS"\n')
    (tmp_path / "pip").chmod(0o755)
    env = {**_dockerfile_args(), **build_args, "PATH": f"{tmp_path}:/usr/bin:/bin", "PIP_ARGS": str(tmp_path / "args")}
    return subprocess.run(["sh", "-c", run], check=False, env=env, capture_output=True, text=True, timeout=30)


def test_dockerfile_builds_cpu_torch_by_default_and_cuda_torch_with_device_cuda(tmp_path):
    args = _dockerfile_args()
    assert args["DEVICE"] == "cpu"
    bootstrap = (ROOT / "scripts/bootstrap.sh").read_text()
    assert f"TORCH_VERSION:-{args['TORCH_VERSION']}" in bootstrap  # the image's torch is the tested one
    for build_args, index in (({}, "https://download.pytorch.org/whl/cpu"),
                              ({"DEVICE": "cuda"}, "https://download.pytorch.org/whl/cu128"),
                              ({"DEVICE": "cuda", "TORCH_CUDA": "cu126"}, "https://download.pytorch.org/whl/cu126"),
                              ({"DEVICE": "cuda", "TORCH_INDEX_URL": "https://mirror/torch"}, "https://mirror/torch")):
        result = _torch_install(tmp_path, **build_args)
        assert result.returncode == 0, result.stderr
        pip = (tmp_path / "args").read_text().split()
        assert pip[pip.index("--index-url") + 1] == index and f"torch=={args['TORCH_VERSION']}" in pip, (build_args, pip)
    result = _torch_install(tmp_path, DEVICE="gpu")
    assert result.returncode != 0 and "DEVICE must be cpu or cuda, got 'gpu'" in result.stderr


# -- secrets stay off command lines ---------------------------------------------------------------

_HEREDOC = re.compile(r"<<EOF\n(.*?)\nEOF", re.DOTALL)
_SECRET_REF = re.compile(r"\$\(|\$\$?\{?\w*(PASSWORD|TOKEN|KEYS)\b|redis://")


def _assert_no_secret_on_command_line(argv: list[str], where: str) -> None:
    """Secrets reach a process through its environment or its stdin (a heredoc of redis-server's
    config, redis-cli's REDISCLI_AUTH), never its arguments: /proc/<pid>/cmdline is public.
    Kubernetes expands $(VAR) in command and args, so that is an argument too."""
    script = "\n".join(argv)
    for body in _HEREDOC.findall(script):
        assert all(re.fullmatch(r"(requirepass|masterauth) \$\$?REDIS_PASSWORD", line) for line in body.splitlines()), body
    outside = re.sub(r"REDISCLI_AUTH=\S+ ", "", _HEREDOC.sub("", script))
    assert not _SECRET_REF.search(outside), f"{where}: a secret on a command line: {outside!r}"



@pytest.mark.parametrize("argv, allowed", [
    (["sh", "-c", "exec redis-server - --port 6379 <<EOF\nrequirepass $$REDIS_PASSWORD\nEOF"], True),
    (["sh", "-c", 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli ping | grep -q PONG'], True),
    (["blockstore", "serve", "--host", "0.0.0.0"], True),
    (["redis-server", "--requirepass", "$(REDIS_PASSWORD)"], False),  # Kubernetes expands it into argv
    (["sh", "-c", "redis-cli -a $REDIS_PASSWORD ping"], False),
    (["serve", "--api-keys", "${KVSTORE_API_KEYS}"], False),
    (["blockstore", "serve", "--redis-url", "redis://:pw@redis:6379/0"], False),
    (["sh", "-c", "redis-server - <<EOF\nrequirepass hunter2\nEOF"], False),  # stdin, but a literal password
])
def test_the_command_line_check_tells_stdin_and_environment_from_arguments(argv, allowed):
    if allowed:
        _assert_no_secret_on_command_line(argv, "x")
    else:
        with pytest.raises(AssertionError):
            _assert_no_secret_on_command_line(argv, "x")

# -- docker-compose: the redis-cluster profile ----------------------------------------------------

def test_compose_redis_cluster_profile_makes_a_cluster_that_a_block_store_uses(monkeypatch):
    from kvstore.config import from_env
    from services.blockstore.server import ENV_PREFIX
    from services.blockstore.server import validate_config as validate_blockstore

    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    services = compose["services"]
    profile = {n for n, svc in services.items() if svc.get("profiles") == ["redis-cluster"]}
    nodes = sorted(n for n in profile if re.fullmatch(r"redis-cluster-\d", n))
    assert profile == {*nodes, "redis-cluster-init", "blockstore-cluster"} and len(nodes) == 3
    password = services["redis-blocks"]["environment"]["REDIS_PASSWORD"]
    for name in nodes:
        node = services[name]
        script = node["command"][-1]
        assert script.startswith("exec redis-server - ") and "--cluster-enabled yes" in script, script
        assert "--maxmemory-policy allkeys-lru" in script  # a cache, like redis-blocks
        assert "requirepass $$REDIS_PASSWORD\n" in script and "masterauth $$REDIS_PASSWORD\n" in script
        assert node["environment"]["REDIS_PASSWORD"] == password
        assert node["image"] == services["redis-blocks"]["image"]
    init = services["redis-cluster-init"]
    create = shlex.split(init["command"][-1].split("exec ", 1)[1])
    assert create[:3] == ["redis-cli", "--cluster", "create"]
    assert create[3:6] == [f"{n}:6379" for n in nodes] and create[6:] == ["--cluster-replicas", "0", "--cluster-yes"]
    assert init["environment"]["REDISCLI_AUTH"] == password  # redis-cli's password, from its environment
    assert all(init["depends_on"][n]["condition"] == "service_healthy" for n in nodes)
    assert init["restart"] == "no"

    store = services["blockstore-cluster"]
    assert store["image"] == services["blockstore"]["image"]
    assert store["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully"
    assert store["command"][:2] == ["blockstore", "serve"]
    env = {var: _interpolate(value) for var, value in store["environment"].items()}
    defaults = from_env(BlockStoreConfig, prefix=ENV_PREFIX, env=env)  # as `blockstore serve` reads them
    config = config_from_args(BlockStoreConfig, build_parser(defaults).parse_args(store["command"][2:]))
    assert config.redis_cluster and urlsplit(config.redis_url).hostname in nodes
    validate_blockstore(config)  # raises (naming the field) on what the service would refuse
    # The session service switches to it with KVSTORE_COMPOSE_BLOCKSTORE=blockstore-cluster:<port>.
    address = next(a for a in services["sessions"]["command"] if "KVSTORE_COMPOSE_BLOCKSTORE" in a)
    assert _interpolate(address) == "blockstore:50051" and config.port == 50051

    for name, service in services.items():
        command = service.get("command", [])
        _assert_no_secret_on_command_line(command if isinstance(command, list) else [command], name)


# -- the Ray cluster launcher config --------------------------------------------------------------

def _ray_start(line: str) -> dict:
    """The options of the `ray start` in a shell line, parsed by Ray's own CLI."""
    from ray.scripts.scripts import start

    [part] = [p for p in line.split(";") if "ray start" in p]
    words = [w for w in shlex.split(part) if not re.fullmatch(r"[A-Z_]+=.*", w)]
    assert words[:2] == ["ray", "start"], line
    return start.make_context("start", words[2:]).params  # click: an unknown option raises


def _documented_commands(text: str, program: str) -> list[list[str]]:
    """`program ...` command lines in the comments of a file, as argv after any VAR=value,
    nohup and a trailing &."""
    commands = []
    for line in text.splitlines():
        if line.startswith("#") and (" " + program + " ") in line:
            words = shlex.split(line.lstrip("# ").rstrip(" &"))
            commands.append([w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w) and w != "nohup"])
    return commands


def test_ray_cluster_launcher_config_passes_rays_own_validation_and_matches_the_cli():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (ROOT / "deploy/ray/cluster.yaml").read_text()
    config = yaml.safe_load(text)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs first
    with pytest.raises(ValidationError, match="setup_comands"):  # the schema is strict: a misspelt key fails
        validate_config(prepare_config({**copy.deepcopy(config), "setup_comands": []}))

    types = config["available_node_types"]
    gpus = sum(t.get("min_workers", 0) * t["resources"].get("GPU", 0) for t in types.values())
    assert gpus >= 1 and all(t.get("min_workers", 0) == t.get("max_workers", 0) for t in types.values())
    head = _ray_start(config["head_start_ray_commands"][-1])
    assert head["head"] and head["dashboard_host"] == "127.0.0.1" and head["num_cpus"] == 0
    worker = _ray_start(config["worker_start_ray_commands"][-1])
    assert worker["address"] == f"$RAY_HEAD_IP:{head['port']}"
    assert "RAY_AUTH_MODE=token ray start" in config["worker_start_ray_commands"][-1]
    assert "~/.ray/auth_token" in config["file_mounts"]  # every node has the cluster's token
    setup = " ".join(config["setup_commands"])
    args = _dockerfile_args()
    assert f'"torch=={args["TORCH_VERSION"]}"' in setup and f"/whl/{args['TORCH_CUDA']} " in setup

    [serve] = _documented_commands(text, "kvstore serve")
    [store] = _documented_commands(text, "kvstore blockstore")
    store_config = config_from_args(BlockStoreConfig, build_parser(BlockStoreConfig()).parse_args(store[3:]))
    serve_config = config_from_args(ServeConfig, cli.build_parser().parse_args(serve[1:]))
    assert serve_config.ray_address == "auto" and serve_config.workers == gpus  # one decode worker per GPU
    assert serve_config.session.blockstore_address.endswith(f":{store_config.port}")
    for var in re.findall(r"\b(KVSTORE_SERVE_\w+)=", text):
        cli.build_parser().parse_args(["serve", "--" + var.removeprefix("KVSTORE_SERVE_").lower().replace("_", "-"), "x"])
    fields = {f.name.upper() for f in dataclasses.fields(BlockStoreConfig)}
    assert {v.removeprefix("KVSTORE_BLOCKSTORE_") for v in re.findall(r"\b(KVSTORE_BLOCKSTORE_\w+)=", text)} <= fields
    for command in (serve, store):
        _assert_no_secret_on_command_line(command, command[1])


# -- Kubernetes: deploy/kubernetes (kustomize) ----------------------------------------------------

K8S_VERSION = "1.30"  # the oldest Kubernetes these manifests are checked against (gRPC probes: 1.27)
KUBE = ROOT / "deploy/kubernetes"
PLACEHOLDER = "REPLACE-ME"


def _env_file(path: Path) -> dict[str, str]:
    """A kustomize `envs` file: KEY=VALUE lines, # comments."""
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(pairs)


def _kustomize() -> tuple[dict, list[dict]]:
    """The kustomization and what `kubectl apply -k` would apply: its resources, and its
    generated Secrets made from the committed *.example files."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    docs = [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((KUBE / name).read_text()) if doc]
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True  # names as written below
    for generator in kustomization["secretGenerator"]:
        data = {k: v for env in generator["envs"] for k, v in _env_file(KUBE / (env + ".example")).items()}
        docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": generator["name"]}, "type": "Opaque",
                     "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})
    for doc in docs:
        doc["metadata"].setdefault("namespace", kustomization["namespace"])
    return kustomization, docs


def _by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _pod_templates(docs: list[dict]) -> dict[str, dict]:
    """Every pod template, by workload (a RayCluster's by group)."""
    templates = {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    for name, ray in _by_kind(docs, "RayCluster").items():
        templates[f"{name}/head"] = ray["spec"]["headGroupSpec"]["template"]
        templates.update({f"{name}/{g['groupName']}": g["template"] for g in ray["spec"]["workerGroupSpecs"]})
    return templates


def _validate_raycluster(doc: dict) -> None:
    """As KubeRay's consumers read it: Ray's own reader of a RayCluster (what Ray's autoscaler on
    KubeRay runs; it validates what it derives), the CRD's map-of-strings ``rayStartParams``, and
    each pod template with Kubernetes' own PodTemplateSpec schema (as a PodTemplate, a built-in
    kind that holds one). KubeRay's CRD itself is on no registry CI reaches."""
    import kubernetes_validate
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster", doc["apiVersion"]
    groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
    for group in groups:
        params = group["rayStartParams"]
        if not all(isinstance(v, str) for v in params.values()):
            raise ValueError(f"rayStartParams must map to strings (the CRD's type): {params}")
    config = _derive_autoscaling_config_from_ray_cr(doc)
    types = config["available_node_types"]
    assert types["headgroup"]["resources"].get("CPU", 0) == 0, types["headgroup"]  # nothing runs on the head
    for group in doc["spec"]["workerGroupSpecs"]:
        assert types[group["groupName"]]["resources"]["GPU"] == 1, types  # one decode worker per pod
    for group in groups:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": group["template"]}, K8S_VERSION, strict=True)


def _validate(doc: dict) -> None:
    import kubernetes_validate

    if doc["apiVersion"].startswith("ray.io/"):
        _validate_raycluster(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_manifests_validate_against_the_kubernetes_schemas_and_rays_kuberay_reader():
    kustomization, docs = _kustomize()
    assert sorted(kustomization["resources"]) == sorted(p.name for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "Deployment", "Deployment", "Namespace", "RayCluster", "Secret",
                     "Service", "Service", "Service", "Service", "StatefulSet"], kinds
    for doc in docs:
        _validate(doc)


def _mutate(kind: str, change) -> dict:
    doc = copy.deepcopy(next(d for d in _kustomize()[1] if d["kind"] == kind))
    change(doc)
    return doc


@pytest.mark.parametrize("kind, change, message", [
    ("Deployment", lambda d: d["spec"].update(replica=2), "replica"),
    ("StatefulSet", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(ports=[{"port": 6379}]),
     "containerPort"),
    ("RayCluster", lambda d: d["spec"].update(workerGroupSpec=d["spec"].pop("workerGroupSpecs")), "workerGroupSpecs"),
    ("RayCluster", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "strings"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].pop("minReplicas"), "minReplicas"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
        resource=d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("resources")), "resource"),
])
def test_the_schema_checks_reject_a_broken_manifest(kind, change, message):
    import jsonschema

    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError, AssertionError), match=message):
        _validate(_mutate(kind, change))


def _container(template: dict, name: str | None = None) -> dict:
    containers = template["spec"]["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def _resolved_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as the kubelet makes it: secretKeyRef values (the example
    Secret's), then $(VAR) references to variables defined above them."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]], f"{var['name']}: no key {ref['key']} in Secret {ref['name']}"
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
            assert "$(" not in value, f"{var['name']}: {var['value']} refers to no variable defined above it"
            env[var["name"]] = value
    return env


def _service_for(docs: list[dict], host_port: str) -> tuple[dict, dict]:
    """The Service a host:port names and the pod template it selects (exactly one)."""
    host, port = host_port.rsplit(":", 1)
    service = _by_kind(docs, "Service")[host]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]], (host_port, service["spec"]["ports"])
    selector = service["spec"]["selector"].items()
    [template] = [t for t in _pod_templates(docs).values() if selector <= t["metadata"]["labels"].items()]
    return service, template


def _host_port(url: str) -> str:
    return f"{urlsplit(url).hostname}:{urlsplit(url).port}"


def _secrets(docs: list[dict]) -> dict[str, dict[str, str]]:
    return {name: {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
            for name, s in _by_kind(docs, "Secret").items()}


def _assert_env_vars_are_settings(container: dict, env: dict[str, str], prefix: str, setting, others=()) -> None:
    """Each variable is a setting (``setting(name)`` raises if not), a part of one (a secret)
    that a later variable uses, or one of ``others``."""
    for var in env:
        if var.startswith(prefix):
            setting(var.removeprefix(prefix))
        else:
            assert var in others or any(f"$({var})" in v.get("value", "") for v in container["env"]), var


def test_kubernetes_services_select_their_pods_and_redis_is_set_up_as_in_compose():
    _, docs = _kustomize()
    assert all(PLACEHOLDER in v for s in _secrets(docs).values() for v in s.values()), "a real secret is committed"
    assert "deploy/kubernetes/secrets.env" in (ROOT / ".gitignore").read_text().split()  # where the real ones go
    templates = _pod_templates(docs)
    for name, service in _by_kind(docs, "Service").items():  # its ports go to ports its pods' container has
        _, template = _service_for(docs, f"{name}:{service['spec']['ports'][0]['port']}")
        ports = {(p.get("name"), p["containerPort"]) for c in template["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert any(port["targetPort"] in pair for pair in ports), (name, port)
    # Sessions are never evicted and kept on a volume; blocks are a cache.
    sessions_redis = _by_kind(docs, "StatefulSet")["kvstore-redis-sessions"]
    container = _container(sessions_redis["spec"]["template"])
    script = container["command"][-1]
    assert "--maxmemory-policy noeviction" in script and "--appendonly yes" in script and "--dir /data" in script
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert sessions_redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    script = _container(templates["kvstore-redis-blocks"])["command"][-1]
    assert "--maxmemory-policy allkeys-lru" in script and "--appendonly no" in script
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    assert {_container(templates[n])["image"] for n in ("kvstore-redis-sessions", "kvstore-redis-blocks")} == \
        {compose["services"]["redis-sessions"]["image"]}


def test_kubernetes_block_store_is_configured_as_its_cli_reads_it():
    from kvstore.config import from_env
    from services.blockstore.server import ENV_PREFIX
    from services.blockstore.server import validate_config as validate_blockstore

    _, docs = _kustomize()
    secrets, templates = _secrets(docs), _pod_templates(docs)
    store = _container(templates["kvstore-blockstore"])
    assert store["args"][:2] == ["blockstore", "serve"] and "command" not in store  # the image's entrypoint: kvstore
    env = _resolved_env(store, secrets)
    fields = {f.name.upper(): f for f in dataclasses.fields(BlockStoreConfig)}
    _assert_env_vars_are_settings(store, env, ENV_PREFIX, lambda name: fields[name])  # KeyError: no such setting
    config = config_from_args(BlockStoreConfig, build_parser(from_env(
        BlockStoreConfig, prefix=ENV_PREFIX, env=env)).parse_args(store["args"][2:]))
    validate_blockstore(config)  # raises, naming the setting, on what the service would refuse
    assert _service_for(docs, _host_port(config.redis_url))[1] is templates["kvstore-redis-blocks"]
    assert urlsplit(config.redis_url).password == secrets["kvstore-secrets"]["block_redis_password"]
    assert store["readinessProbe"]["grpc"]["port"] == config.port  # grpc.health.v1
    assert {p["containerPort"] for p in store["ports"]} == {config.port, config.metrics_port}


def test_kubernetes_session_service_drives_the_raycluster_as_its_cli_reads_it(monkeypatch):
    from ray.scripts.scripts import start

    from services.cli.keys import api_keys
    from services.session.server import validate_config as validate_session

    _, docs = _kustomize()
    secrets, templates = _secrets(docs), _pod_templates(docs)
    deployment = _by_kind(docs, "Deployment")["kvstore-sessions"]
    assert deployment["spec"]["replicas"] == 2  # sharing the workers (below)
    sessions = _container(templates["kvstore-sessions"])
    assert sessions["command"][:2] == ["sh", "-c"]
    ray_line, serve_line = sessions["command"][2].split("&&")
    # `ray start` joins the RayCluster's head through the Service KubeRay makes for it.
    ray_start = _ray_start(ray_line)
    [(cluster_name, ray)] = _by_kind(docs, "RayCluster").items()
    head = _container(ray["spec"]["headGroupSpec"]["template"])
    gcs_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "gcs-server")
    assert ray_start["address"] == f"{cluster_name}-head-svc:{gcs_port}"
    assert (ray_start["num_cpus"], ray_start["num_gpus"]) == (0, 0)  # no decode worker lands on the driver's node
    assert ray["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"  # Ray stays inside
    # Then `kvstore serve` attaches to it, with its settings from the environment (secrets) and flags.
    serve_argv = shlex.split(serve_line)
    assert serve_argv[:3] == ["exec", "kvstore", "serve"]
    env = _resolved_env(sessions, secrets)
    _assert_env_vars_are_settings(
        sessions, env, "KVSTORE_SERVE_", others=("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"),
        setting=lambda name: cli.build_parser().parse_args(["serve", "--" + name.lower().replace("_", "-"), "x"]))
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    serve = config_from_args(ServeConfig, cli.build_parser().parse_args(serve_argv[2:]))
    validate_session(dataclasses.replace(
        serve.session, api_keys=api_keys(serve.session.host, serve.session.api_keys, serve.api_keys_file)))
    assert serve.ray_address == "auto" and serve.shared_workers
    Service(serve)  # replicas sharing the workers need the shared tiers: it refuses a config without them
    assert _service_for(docs, serve.session.blockstore_address)[1] is templates["kvstore-blockstore"]
    assert serve.session.blockstore_token == secrets["kvstore-secrets"]["blockstore_token"]
    assert _service_for(docs, _host_port(serve.session.redis_url))[1] is templates["kvstore-redis-sessions"]
    assert sessions["readinessProbe"]["grpc"]["port"] == serve.session.port
    assert {p["containerPort"] for p in sessions["ports"]} == {serve.session.port, serve.session.metrics_port}
    assert ray["spec"]["authOptions"]["mode"] == "token"
    assert env["RAY_AUTH_TOKEN"] == secrets[ray["spec"]["authOptions"]["secretName"]]["auth_token"]
    # One decode worker per GPU: --workers is the GPUs of the worker groups, one per pod.
    gpus = 0
    for group in ray["spec"]["workerGroupSpecs"]:
        limits = _container(group["template"])["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == 1 and group["minReplicas"] == group["replicas"] == group["maxReplicas"]
        gpus += group["replicas"]
    assert serve.workers == gpus, (serve.workers, gpus)
    for params in [ray["spec"]["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in ray["spec"]["workerGroupSpecs"]]:
        start.make_context("start", [f"--{k}={v}" for k, v in params.items()])  # KubeRay passes them to `ray start`


def test_kubernetes_containers_run_the_image_have_probes_and_no_secret_on_a_command_line():
    kustomization, docs = _kustomize()
    [image] = kustomization["images"]
    [cluster_name] = _by_kind(docs, "RayCluster")
    for where, template in _pod_templates(docs).items():
        for container in template["spec"]["containers"]:
            assert container["image"].startswith("redis:") or container["image"] == f"{image['name']}:latest", where
            for probe in ("readinessProbe", "livenessProbe"):  # KubeRay adds Ray's own to its pods
                assert probe in container or where.startswith(cluster_name + "/"), (where, probe)
            argv = container.get("command", []) + container.get("args", [])
            argv += container.get("readinessProbe", {}).get("exec", {}).get("command", [])
            _assert_no_secret_on_command_line(argv, where)
