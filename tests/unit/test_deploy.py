"""deploy/: every kustomize overlay renders and validates strictly, custom resources included; the two
brokers have stable names that every worker and gateway lists, and a budget that keeps one; the CURVE
keys the pods mount are the ones the documented command makes; and every PromQL query (the Grafana
dashboard, the KEDA triggers, the alert rules) names only metrics the broker and the gateway export,
and aggregates over the brokers as it should.

Neither kustomize nor kubectl is available here, so deploy/render.py renders the overlays: it
implements the subset of kustomize that deploy/ uses and refuses the rest. kubernetes-validate checks
the built-in kinds against a pinned Kubernetes version; it knows no CRDs and takes no extra schemas,
so the custom resources (KEDA's ScaledObject, the Prometheus operator's ServiceMonitor and
PrometheusRule) are checked with jsonschema against deploy/schemas/, which refer to the same pinned
Kubernetes definitions for metadata, label selectors and HPA behaviour.
"""

from __future__ import annotations

import base64
import functools
import importlib.resources
import importlib
import importlib.util
import json
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from tests.processes import REPO

KUBERNETES_VERSION = "1.31.0"
DEPLOY = REPO / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
OVERLAYS = sorted(path.name for path in (KUSTOMIZE / "overlays").iterdir() if path.is_dir())
POOL_OVERLAYS = [name for name in OVERLAYS if name.startswith("pool-")]  # pool workers (components/pool)
FIXED_OVERLAYS = [name for name in OVERLAYS if name not in POOL_OVERLAYS]  # workers of one model (--model)
CURVE_OVERLAYS = [name for name in OVERLAYS if not name.endswith("-no-curve")]
README = DEPLOY / "README.md"
SLIM_IMAGE, WORKER_CPU_IMAGE, WORKER_CUDA_IMAGE = "ddml:0.1.0-slim", "ddml-worker:0.1.0-cpu", "ddml-worker:0.1.0-cuda"
# Labels Prometheus adds to every series of a target that the Prometheus operator discovers.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "service", "pod", "container", "endpoint"})


def _load_renderer():
    spec = importlib.util.spec_from_file_location("ddml_deploy_render", DEPLOY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_renderer()


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(render.render(KUSTOMIZE / "overlays" / overlay))


def objects_of(overlay: str, kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in rendered(overlay) if obj["kind"] == kind}


def workloads(overlay: str) -> dict[str, dict]:
    """The pod controllers by name: the brokers' StatefulSet and the gateway and worker Deployments."""
    return {**objects_of(overlay, "StatefulSet"), **objects_of(overlay, "Deployment")}


def container(deployment: dict) -> dict:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


def flag(deployment: dict, name: str) -> str | None:
    """The value of the last `name` among the container's args (argparse: the last one wins)."""
    args = container(deployment)["args"]
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == name]
    return values[-1] if values else None


# -- validation ----------------------------------------------------------------------------------

@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = [json.loads(path.read_text()) for path in sorted((DEPLOY / "schemas").glob("*.json"))]
    return {(s["properties"]["apiVersion"]["const"], s["properties"]["kind"]["const"]): s for s in schemas}


@functools.cache
def schema_registry() -> Registry:
    folder = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
              / f"v{KUBERNETES_VERSION}-local-strict")
    definitions = json.loads((folder / "_definitions.json").read_text())
    resources = [(definitions["$id"], Resource.from_contents(definitions))]
    resources += [(schema["$id"], Resource.from_contents(schema)) for schema in crd_schemas().values()]
    return Registry().with_resources(resources)


def validation_errors(obj: dict) -> list[str]:
    """Every reason `obj` is invalid: the pinned Kubernetes schemas, strict, or deploy/schemas/ for a CRD."""
    where = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    schema = crd_schemas().get((obj.get("apiVersion"), obj.get("kind")))
    if schema is not None:
        validator = jsonschema.Draft202012Validator(schema, registry=schema_registry())
        return [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{where}: {'.'.join(map(str, error.path))}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:  # the CLI only warns: here it fails
        return [f"{where}: no schema: {error.message}; add one to deploy/schemas/"]
    return []


# -- the renderer --------------------------------------------------------------------------------

def test_every_kustomization_uses_only_what_the_renderer_implements():
    kustomizations = sorted(KUSTOMIZE.rglob("kustomization.yaml"))
    assert len(kustomizations) >= 1 + len(OVERLAYS)
    for path in kustomizations:
        render.check_kustomization(path)  # raises on any field, patch or image key it does not implement


def write_tree(root: Path, files: dict[str, object]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else yaml.safe_dump_all(content, sort_keys=False))
    return root


KUSTOMIZATION = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
COMPONENT = {"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component"}
DEPLOYMENT = {
    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "n", "labels": {"a": "1"}},
    "spec": {"template": {"spec": {
        "containers": [
            {"name": "one", "image": "repo:5000/img:1.0", "args": ["--x", "1"],
             "env": [{"name": "A", "value": "1"}], "volumeMounts": [{"name": "v", "mountPath": "/v"}]},
            {"name": "two", "image": "other@sha256:abc"},
        ],
        "volumes": [{"name": "v", "emptyDir": {}}],
        "tolerations": [{"key": "k", "operator": "Exists"}],
    }}},
}


def test_the_renderer_merges_patches_and_images_as_kustomize_does(tmp_path):
    write_tree(tmp_path, {
        "base/kustomization.yaml": [{**KUSTOMIZATION, "resources": ["d.yaml"]}],
        "base/d.yaml": [DEPLOYMENT],
        "component/kustomization.yaml": [{**COMPONENT, "images": [{"name": "repo:5000/img", "newTag": "2.0"}],
                                          "patches": [{"path": "smp.yaml"}]}],
        "component/smp.yaml": [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
            "name": "d", "namespace": "n", "labels": {"a": None, "b": "2"}}, "spec": {"template": {"spec": {
                "containers": [{"name": "one", "args": ["--y"], "env": [{"name": "B", "value": "2"}],
                                "volumeMounts": [{"name": "w", "mountPath": "/w"}]},
                               {"name": "three", "image": "new"}],
                "volumes": [{"name": "w", "secret": {"secretName": "s"}}],
                "tolerations": [{"key": "g", "operator": "Exists"}]}}}}],
        "overlay/kustomization.yaml": [{
            **KUSTOMIZATION, "resources": ["../base"], "components": ["../component"],
            "images": [{"name": "other", "newName": "reg/other", "digest": "sha256:def"}],
            "patches": [{"target": {"kind": "Deployment", "name": "d"}, "patch": yaml.safe_dump([
                {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--z"},
                {"op": "replace", "path": "/spec/template/spec/containers/1/name", "value": "2"},
                {"op": "remove", "path": "/spec/template/spec/containers/0/env/0"},
                {"op": "add", "path": "/metadata/annotations", "value": {"x~/y": "1"}}])}],
        }],
    })
    [deployment] = render.render(tmp_path / "overlay")
    assert deployment["metadata"] == {"name": "d", "namespace": "n", "labels": {"b": "2"}, "annotations": {"x~/y": "1"}}
    pod = deployment["spec"]["template"]["spec"]
    one, two, three = pod["containers"]  # merged by name; a new name is appended
    assert one == {"name": "one", "image": "repo:5000/img:2.0", "args": ["--y", "--z"],  # args: replaced, then appended
                   "env": [{"name": "B", "value": "2"}],  # merged by name, then the JSON patch removed A
                   "volumeMounts": [{"name": "v", "mountPath": "/v"}, {"name": "w", "mountPath": "/w"}]}
    assert two == {"name": "2", "image": "reg/other@sha256:def"} and three == {"name": "three", "image": "new"}
    assert [v["name"] for v in pod["volumes"]] == ["v", "w"]
    assert pod["tolerations"] == [{"key": "g", "operator": "Exists"}]  # no merge key: replaced
    assert DEPLOYMENT["spec"]["template"]["spec"]["containers"][0]["args"] == ["--x", "1"]  # inputs untouched


@pytest.mark.parametrize("kustomization, files, complaint", [
    ({"namePrefix": "x-", "resources": ["d.yaml"]}, {}, "namePrefix"),
    ({"resources": ["d.yaml"], "patches": [{"path": "p.yaml", "options": {}}]}, {}, "options"),
    ({"resources": ["d.yaml"], "images": [{"name": "a", "newname": "b"}]}, {}, "newname"),
    ({"resources": ["../d.yaml"]}, {}, "outside"),
    ({"resources": ["d.yaml", "d.yaml"]}, {}, "twice"),
    ({"resources": ["d.yaml"], "patches": [{"path": "p.yaml"}]},
     {"p.yaml": [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                  "spec": {"template": {"spec": {"$patch": "replace"}}}}]}, "$patch"),
    ({"resources": ["d.yaml"], "patches": [{"target": {"kind": "Deployment"}, "patch": "- {op: move, from: /a, path: /b}"}]},
     {}, "op"),
    ({"resources": ["d.yaml"], "patches": [{"target": {"kind": "Service"}, "patch": "- {op: remove, path: /spec}"}]},
     {}, "matches nothing"),
    ({"resources": ["d.yaml"], "images": [{"name": "nowhere", "newTag": "1"}]}, {}, "matches no container"),
])
def test_the_renderer_refuses_what_it_does_not_implement(tmp_path, kustomization, files, complaint):
    write_tree(tmp_path, {"k/kustomization.yaml": [{**KUSTOMIZATION, **kustomization}], "k/d.yaml": [DEPLOYMENT],
                          "d.yaml": [DEPLOYMENT], **{f"k/{name}": content for name, content in files.items()}})
    with pytest.raises(render.KustomizeError, match=re.escape(complaint)):
        render.render(tmp_path / "k")


# -- the overlays --------------------------------------------------------------------------------

def test_the_overlays_are_cpu_and_gpu_each_with_curve_on_and_off_and_pools_on_cpu_and_gpu():
    assert FIXED_OVERLAYS == ["cpu", "cpu-no-curve", "gpu", "gpu-no-curve"]
    assert POOL_OVERLAYS == ["pool-cpu", "pool-gpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_of_the_overlay_validates_strictly(overlay):
    objects = rendered(overlay)
    kinds = {obj["kind"] for obj in objects}
    assert {"Namespace", "StatefulSet", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "ServiceMonitor", "PrometheusRule", "ScaledObject"} <= kinds
    errors = [error for obj in objects for error in validation_errors(obj)]
    assert not errors, "\n".join(errors)


def mutated(obj: dict, change) -> dict:
    changed = json.loads(json.dumps(obj))
    change(changed)
    return changed


@pytest.mark.parametrize("kind, change", [
    ("ScaledObject", lambda o: o["spec"]["triggers"][0]["metadata"].update(threshold=5)),  # metadata values: strings
    ("ScaledObject", lambda o: o["spec"].update(minReplicas=1)),
    ("ScaledObject", lambda o: o["spec"]["triggers"][0]["metadata"].pop("query")),
    ("ScaledObject", lambda o: o["spec"]["triggers"][0]["metadata"].update(metricName="x")),  # gone since KEDA 2.12
    ("ScaledObject", lambda o: o["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
     .update(stabilisationWindowSeconds=1)),  # the pinned Kubernetes HPA schema applies
    ("ScaledObject", lambda o: o["metadata"].update(label={"a": "b"})),  # the pinned ObjectMeta applies
    ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval="15 seconds")),
    ("ServiceMonitor", lambda o: o["spec"].pop("selector")),
    ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(metricsPath="/metrics")),
    ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].pop("expr")),
    ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update(record="x")),  # alert and record
    ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update(for_="5m")),
    ("Deployment", lambda o: o["spec"]["template"]["spec"]["containers"][0].update(preStop={})),
    ("StatefulSet", lambda o: o["spec"].update(strategy={"type": "RollingUpdate"})),  # a Deployment's field
    ("StatefulSet", lambda o: o["spec"].update(replicas="2")),
    ("PodDisruptionBudget", lambda o: o["spec"].update(maxUnavailable=[1])),
])
def test_validation_refuses_what_the_api_server_or_the_operators_would(kind, change):
    original = next(iter(objects_of("gpu", kind).values()))
    assert not validation_errors(original)
    assert validation_errors(mutated(original, change))


def test_the_overlays_differ_only_in_the_device_and_curve():
    def pods_aside(overlay):
        return [obj for obj in rendered(overlay) if obj["kind"] not in ("Deployment", "StatefulSet")]

    for overlay in FIXED_OVERLAYS:
        assert pods_aside(overlay) == pods_aside("cpu"), overlay
        deployments = workloads(overlay)
        assert set(deployments) == {"ddml-broker", "ddml-gateway", "ddml-worker"}
        assert set(objects_of(overlay, "StatefulSet")) == {"ddml-broker"}
        assert container(deployments["ddml-broker"])["image"] == container(deployments["ddml-gateway"])["image"] == SLIM_IMAGE
        worker = deployments["ddml-worker"]
        gpu = overlay.startswith("gpu")
        assert container(worker)["image"] == (WORKER_CUDA_IMAGE if gpu else WORKER_CPU_IMAGE)
        resources = container(worker)["resources"]
        assert (resources["limits"].get("nvidia.com/gpu"), resources["requests"].get("nvidia.com/gpu")) == \
            ((1, 1) if gpu else (None, None))
        assert flag(worker, "--max-batch-size") == ("128" if gpu else "64")
        assert ("nvidia.com/gpu" in json.dumps(worker["spec"]["template"]["spec"].get("tolerations"))) == gpu
        curve = overlay in CURVE_OVERLAYS
        for deployment in deployments.values():
            args = " ".join(container(deployment)["args"])
            secrets = [v for v in deployment["spec"]["template"]["spec"].get("volumes", []) if "secret" in v]
            assert ("--curve-secret-key" in args) == curve and bool(secrets) == curve, (overlay, deployment)


def test_no_manifest_carries_key_material_or_a_placeholder():
    for overlay in OVERLAYS:
        assert not [obj for obj in rendered(overlay) if obj["kind"] == "Secret"]
        # The one ConfigMap, a pool's model repository, holds model settings only (checked below).
        assert [obj["metadata"]["name"] for obj in rendered(overlay) if obj["kind"] == "ConfigMap"] == \
            (["ddml-repository"] if overlay in POOL_OVERLAYS else [])
        text = yaml.safe_dump_all(rendered(overlay))
        for needle in ("public-key =", "secret-key =", "replace with", "CHANGEME"):  # zmq.auth certificates
            assert needle not in text, (overlay, needle)
        assert not re.search(r"<[A-Za-z_-]+>", text), overlay  # no <placeholder>


def run_documented_secret_command(keys_dir: Path) -> dict:
    """What the README's command does: three `ddml-keys generate` and `kubectl create secret --from-file=DIR`."""
    from ddml_common.keys import main as ddml_keys

    [command] = [line.strip() for line in README.read_text().splitlines()
                 if "kubectl -n ddml create secret generic ddml-curve --from-file=" in line]
    names = re.search(r"for n in ([\w ]+); do ddml-keys generate \"\$d\" \"?\$n\"?; done", command)
    assert names and names.group(1).split() == ["broker", "worker", "gateway"], command
    for name in names.group(1).split():
        ddml_keys(["generate", str(keys_dir), name])
    data = {path.name: base64.b64encode(path.read_bytes()).decode()  # --from-file=DIR: each regular file
            for path in sorted(keys_dir.iterdir()) if path.is_file()}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "ddml-curve", "namespace": "ddml"}, "data": data}


@pytest.mark.parametrize("overlay", CURVE_OVERLAYS)
def test_the_documented_secret_holds_every_key_the_pods_mount_and_the_keys_fit(overlay, tmp_path):
    import zmq
    import zmq.auth

    from broker.curve import BrokerSecurity
    from ddml_common.keys import ClientKeys

    secret = run_documented_secret_command(tmp_path / "keys")
    assert not validation_errors(secret)
    files = {}  # role -> {flag: path on this machine, as the pod would see it}
    for name, deployment in workloads(overlay).items():
        role, pod = name.removeprefix("ddml-"), deployment["spec"]["template"]["spec"]
        root = tmp_path / role
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container(deployment).get("volumeMounts", []):
            if "secret" not in volumes[mount["name"]]:
                continue  # a pool's repository (a ConfigMap)
            source = volumes[mount["name"]]["secret"]
            assert source["secretName"] == secret["metadata"]["name"]
            for item in source["items"]:
                assert item["key"] in secret["data"], (name, item)
                path = root / mount["mountPath"].lstrip("/") / item["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(base64.b64decode(secret["data"][item["key"]]))
        files[role] = {f: root / flag(deployment, f).lstrip("/") for f in
                       ("--curve-secret-key", "--curve-server-key", "--authorized-workers", "--authorized-clients")
                       if flag(deployment, f)}
    broker = BrokerSecurity(zmq.Context.instance(), str(files["broker"]["--curve-secret-key"]),
                            str(files["broker"]["--authorized-workers"]), str(files["broker"]["--authorized-clients"]))
    broker.reload()
    worker, gateway = (ClientKeys.load(str(files[r]["--curve-server-key"]), str(files[r]["--curve-secret-key"]))
                       for r in ("worker", "gateway"))
    broker_public, broker_secret = zmq.auth.load_certificate(str(files["broker"]["--curve-secret-key"]))
    assert broker_secret and worker.server_public == gateway.server_public == broker_public
    # Each key in its own domain only: a worker key cannot send requests, nor a gateway key serve.
    assert broker.allowed == {"worker": frozenset({worker.public}), "gateway": frozenset({gateway.public})}


def broker_names(overlay: str) -> list[str]:
    """The DNS names that the brokers' StatefulSet and its headless Service give the broker pods, by ordinal,
    as they resolve from the same namespace: `<pod>.<service>` (the pod's hostname and subdomain)."""
    broker = objects_of(overlay, "StatefulSet")["ddml-broker"]
    service = objects_of(overlay, "Service")[broker["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"  # headless: an A record per pod, no virtual IP
    assert service["metadata"]["namespace"] == broker["metadata"]["namespace"]
    assert service["spec"]["selector"].items() <= broker["spec"]["template"]["metadata"]["labels"].items()
    return [f"{broker['metadata']['name']}-{ordinal}.{service['metadata']['name']}"
            for ordinal in range(broker["spec"]["replicas"])]


def selects(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items() and not selector.get("matchExpressions")


def admitted_ports(policy: dict, labels: dict) -> set:
    """The ports of the policy's pods that a pod of the policy's namespace with these labels may reach."""
    ports = set()
    for rule in policy["spec"]["ingress"]:
        assert rule["ports"], rule  # every rule names its ports
        sources = rule.get("from")
        if not sources or any(set(source) == {"podSelector"} and selects(source["podSelector"], labels)
                              for source in sources):
            ports |= {p["port"] for p in rule["ports"]}
    return ports


def test_two_equal_brokers_with_stable_names_and_a_budget_that_keeps_one():
    for overlay in OVERLAYS:
        assert "ddml-broker" not in objects_of(overlay, "Deployment")
        broker = objects_of(overlay, "StatefulSet")["ddml-broker"]
        spec, pod = broker["spec"], broker["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert spec["replicas"] == 2 and spec["podManagementPolicy"] == "Parallel"
        assert container(broker)["readinessProbe"]["tcpSocket"] == {"port": "frontend"}
        assert broker_names(overlay) == ["ddml-broker-0.ddml-broker", "ddml-broker-1.ddml-broker"]
        # Updates restart one broker at a time, and only once the one before is ready, which a restarted
        # broker is no sooner than some seconds after its start: time for the workers to register with it
        # before the other drains. They can, because its name resolves while it is unready too. (With
        # Parallel, minReadySeconds would not pace the update: the controller waits for Ready only.)
        assert spec["updateStrategy"] == {"type": "RollingUpdate"}
        assert container(broker)["readinessProbe"]["initialDelaySeconds"] >= 5
        assert objects_of(overlay, "Service")["ddml-broker"]["spec"]["publishNotReadyAddresses"] is True
        # Different nodes where possible (preferred: a one-node cluster still runs both).
        terms = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["spec"]["affinity"]["podAntiAffinity"]
        assert any(t["weight"] == 100 and t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
                   and selects(t["podAffinityTerm"]["labelSelector"], labels) for t in terms)
        # A voluntary disruption (a drain) never takes both: one budget, at most one broker unavailable.
        [budget] = [pdb for pdb in objects_of(overlay, "PodDisruptionBudget").values()
                    if selects(pdb["spec"]["selector"], labels)]
        assert budget["spec"]["maxUnavailable"] == 1 and "minAvailable" not in budget["spec"]
        assert spec["replicas"] - budget["spec"]["maxUnavailable"] >= 1
        # SIGTERM drains for --drain-timeout-s; the kubelet waits longer before SIGKILL.
        assert pod["spec"]["terminationGracePeriodSeconds"] > float(flag(broker, "--drain-timeout-s"))


def test_probes_hooks_budgets_and_references_fit_together():
    for overlay in OVERLAYS:
        deployments = workloads(overlay)
        pods = {name: d["spec"]["template"] for name, d in deployments.items()}
        for name, deployment in deployments.items():
            c = container(deployment)
            assert c["command"] == [name]  # the role is the command; the image only picks slim or worker
            assert c["livenessProbe"] and c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
            assert deployment["spec"]["selector"]["matchLabels"].items() <= pods[name]["metadata"]["labels"].items()
        broker, gateway, worker = (deployments[f"ddml-{role}"] for role in ("broker", "gateway", "worker"))
        ports = {name: {p["name"]: p["containerPort"] for p in container(d)["ports"]}
                 for name, d in deployments.items() if "ports" in container(d)}
        # The broker's liveness is its loop: /healthz on the metrics port.
        probe = container(broker)["livenessProbe"]["httpGet"]
        assert probe["path"] == "/healthz" and ports["ddml-broker"][probe["port"]] == int(flag(broker, "--metrics-port"))
        # The gateway leaves the endpoints before gunicorn stops, and the grace period covers both.
        g = container(gateway)
        assert g["readinessProbe"]["httpGet"]["path"] == "/readyz" and g["livenessProbe"]["httpGet"]["path"] == "/healthz"
        sleep_command = g["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep_command[0] == "sleep" and 5 <= int(sleep_command[1]) <= 15
        assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= int(sleep_command[1]) + 30 + 5
        # Workers drain on SIGTERM: time for their two batches in hand.
        assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
        # Autoscalers own the replica counts.
        assert "replicas" not in gateway["spec"] and "replicas" not in worker["spec"]
        [hpa] = objects_of(overlay, "HorizontalPodAutoscaler").values()
        [scaled] = objects_of(overlay, "ScaledObject").values()
        assert hpa["spec"]["scaleTargetRef"]["name"] == "ddml-gateway"
        assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ddml-worker"}
        assert scaled["spec"]["minReplicaCount"] >= 1  # gateways are unready with no worker: nothing would wake it
        for trigger in scaled["spec"]["triggers"]:
            if overlay in POOL_OVERLAYS:  # every model's demand together: any pool worker may load any model
                assert "model=" not in trigger["metadata"]["query"] and flag(worker, "--model") is None
            else:
                assert f'model="{flag(worker, "--model")}"' in trigger["metadata"]["query"]
        # Budgets, Services, monitors and the policy select pods and ports that exist.
        budgets = objects_of(overlay, "PodDisruptionBudget")
        assert {name for name, pdb in budgets.items()
                if pdb["spec"]["selector"]["matchLabels"].items() <= pods[name]["metadata"]["labels"].items()} \
            == {"ddml-broker", "ddml-gateway", "ddml-worker"}
        services = objects_of(overlay, "Service")
        for name, service in services.items():
            assert service["spec"]["selector"].items() <= pods[name]["metadata"]["labels"].items()
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports[name])
            if service["spec"].get("clusterIP") == "None":  # headless: clients dial the pods' own ports
                assert all(p["port"] == ports[name][p["targetPort"]] for p in service["spec"]["ports"])
        for name, monitor in objects_of(overlay, "ServiceMonitor").items():
            [service] = [s for s in services.values()
                         if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
            assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
            assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
        # The policy covers every broker pod: gateways reach the frontend, workers the backend, anyone the
        # metrics, and nothing else is open.
        [policy] = objects_of(overlay, "NetworkPolicy").values()
        assert selects(policy["spec"]["podSelector"], pods["ddml-broker"]["metadata"]["labels"])
        assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == set(ports["ddml-broker"])
        assert admitted_ports(policy, pods["ddml-gateway"]["metadata"]["labels"]) == {"frontend", "metrics"}
        assert admitted_ports(policy, pods["ddml-worker"]["metadata"]["labels"]) == {"backend", "metrics"}
        assert admitted_ports(policy, {"app.kubernetes.io/name": "something-else"}) == {"metrics"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_command_line_parses_with_the_real_cli(overlay, monkeypatch):
    for name in [name for name in os.environ if name.startswith("DDML_")]:
        monkeypatch.delenv(name)  # the manifest's flags only
    from gateway.broker_client import BrokerClient
    from worker.__main__ import config_from_args
    from worker.connection import broker_endpoints

    args = {}
    for name, deployment in workloads(overlay).items():
        role = name.removeprefix("ddml-")
        parser = importlib.import_module(f"{role}.__main__").build_parser()
        args[role] = parser.parse_args(container(deployment)["args"])  # an unknown or renamed flag exits here
    # Every worker and every gateway dials every broker pod, by the names the StatefulSet and its headless
    # Service create, in the same order (ordinal), on the port each broker binds; the lists split as the
    # worker and the gateway's BrokerClient split them.
    dialled = {"worker": broker_endpoints(config_from_args(args["worker"]).broker),
               "gateway": BrokerClient(args["gateway"].broker).endpoints}
    broker = workloads(overlay)["ddml-broker"]
    container_ports = {p["name"]: p["containerPort"] for p in container(broker)["ports"]}
    for role, socket in (("gateway", "frontend"), ("worker", "backend")):
        bound = int(getattr(args["broker"], socket).rpartition(":")[2])
        assert container_ports[socket] == bound
        assert dialled[role] == [f"tcp://{name}:{bound}" for name in broker_names(overlay)], role
        assert len(dialled[role]) == broker["spec"]["replicas"] == 2
        # Short names resolve in the client's own namespace: the brokers' one.
        assert workloads(overlay)[f"ddml-{role}"]["metadata"]["namespace"] == broker["metadata"]["namespace"]


def memory_mb(quantity: str) -> float:
    units = {"Ki": 2**-10, "Mi": 1, "Gi": 2**10}
    return float(quantity[:-2]) * units[quantity[-2:]]


@pytest.mark.parametrize("pool, fixed", [("pool-cpu", "cpu"), ("pool-gpu", "gpu")])
def test_a_pool_overlay_is_its_fixed_counterpart_with_pool_workers_that_keda_scales_on_every_models_demand(
        pool, fixed):
    def aside(overlay):
        return [obj for obj in rendered(overlay) if obj["kind"] not in ("Deployment", "ConfigMap", "ScaledObject")]

    assert aside(pool) == aside(fixed)
    assert workloads(pool)["ddml-gateway"] == workloads(fixed)["ddml-gateway"]
    worker, fixed_worker = workloads(pool)["ddml-worker"], workloads(fixed)["ddml-worker"]
    c, fixed_c = container(worker), container(fixed_worker)
    assert c["image"] == fixed_c["image"] and c["livenessProbe"] == fixed_c["livenessProbe"]
    assert c["startupProbe"] == fixed_c["startupProbe"]
    assert c["resources"].keys() == fixed_c["resources"].keys()
    assert c["resources"]["limits"].get("nvidia.com/gpu") == fixed_c["resources"]["limits"].get("nvidia.com/gpu")
    args = " ".join(c["args"])
    assert "--pool --repository" in args and "--model " not in args
    assert ("--curve-secret-key" in args) == ("--curve-secret-key" in " ".join(fixed_c["args"]))
    # The repository is the ConfigMap's file, mounted where --repository reads it.
    [repository] = objects_of(pool, "ConfigMap").values()
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    [mount] = [m for m in c["volumeMounts"] if "configMap" in volumes[m["name"]]]
    assert volumes[mount["name"]]["configMap"]["name"] == repository["metadata"]["name"] and mount["readOnly"]
    directory, _, file = flag(worker, "--repository").rpartition("/")
    assert directory == mount["mountPath"] and file in repository["data"]
    # On a CPU the budget fits the pod's memory limit; on a GPU it is the GPU's (0).
    budget_mb = float(flag(worker, "--memory-budget-mb"))
    if "nvidia.com/gpu" in c["resources"]["limits"]:
        assert budget_mb == 0
    else:
        assert 0 < budget_mb < memory_mb(c["resources"]["limits"]["memory"])
    # KEDA: the same bounds and pace as for fixed workers, on the demand of every model together.
    [scaled], [fixed_scaled] = objects_of(pool, "ScaledObject").values(), objects_of(fixed, "ScaledObject").values()
    assert {k: v for k, v in scaled["spec"].items() if k != "triggers"} == \
        {k: v for k, v in fixed_scaled["spec"].items() if k != "triggers"}
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"oldest-wait", "queued-inputs", "models-in-demand"}
    fixed_queued = next(t for t in fixed_scaled["spec"]["triggers"] if t["name"] == "queued-inputs")
    assert triggers["queued-inputs"]["metadata"]["threshold"] == fixed_queued["metadata"]["threshold"]
    assert triggers["queued-inputs"]["metadata"]["query"] == 'sum(ddml_queue_inputs{namespace="ddml"})'
    # One pool worker per --max-models models that have inputs waiting or a replica loaded.
    models = triggers["models-in-demand"]
    assert models["metricType"] == "AverageValue" and models["metadata"]["threshold"] == flag(worker, "--max-models")
    metrics, grouping = promql_names(models["metadata"]["query"])
    assert set(metrics) == {"ddml_queue_inputs", "ddml_model_replicas"} and grouping == {"model"}
    assert models["metadata"]["query"].startswith("count(max by (model) (")


@pytest.mark.parametrize("overlay", POOL_OVERLAYS)
def test_the_pool_repository_parses_with_the_real_worker_and_its_models_fit_the_budget(overlay, monkeypatch):
    for name in [name for name in os.environ if name.startswith("DDML_")]:
        monkeypatch.delenv(name)
    from ddml_common.repository import parse_repository
    from worker.__main__ import build_parser, config_from_args
    from worker.models import BUILT_IN_MODELS
    from worker.pool import model_configs, model_flags

    worker = workloads(overlay)["ddml-worker"]
    parser = build_parser()
    args = parser.parse_args(container(worker)["args"])
    assert args.pool and args.max_models >= 1 and args.num_workers == 1 and not args.cuda_devices
    [configmap] = objects_of(overlay, "ConfigMap").values()
    text = configmap["data"][args.repository.rpartition("/")[2]]
    repository = parse_repository(text, args.repository, model_flags(parser))  # RepositoryError names the fault
    configs = model_configs(repository, config_from_args(args), lambda argv: config_from_args(parser.parse_args(argv)))
    assert sorted(configs) == sorted(repository.models) and len(configs) >= 2
    for name, config in configs.items():  # each loads in the worker image: built in (no files to ship)
        assert name in BUILT_IN_MODELS and not config.handler and not config.model_path, name
        assert config.broker == config_from_args(args).broker
    # The models a pod may hold at once fit its budget, and min-replicas keep a pod wanted.
    estimates = sorted((entry.placement.memory_mb for entry in repository.models.values()), reverse=True)
    assert all(estimates), "every model gives memory-mb: a load on a CPU is not measured"
    if args.memory_budget_mb:
        assert sum(estimates[:args.max_models]) <= args.memory_budget_mb
    [scaled] = objects_of(overlay, "ScaledObject").values()
    assert sum(e.placement.min_replicas for e in repository.models.values()) >= 1
    assert scaled["spec"]["minReplicaCount"] >= 1


ALLOWED_VOLUMES = {"configMap", "secret", "emptyDir", "projected", "downwardAPI", "persistentVolumeClaim", "csi",
                   "ephemeral"}


def test_pods_meet_the_restricted_pod_security_standard_the_namespace_enforces():
    for overlay in OVERLAYS:
        [namespace] = objects_of(overlay, "Namespace").values()
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        for name, deployment in workloads(overlay).items():
            pod = deployment["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
            assert all(set(v) - {"name"} <= ALLOWED_VOLUMES for v in pod.get("volumes", []))
            for c in pod["containers"]:
                context = c["securityContext"]
                assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
                assert not context.get("privileged") and "hostPort" not in json.dumps(c.get("ports", []))


def test_the_prometheus_rule_holds_exactly_the_alerts_file():
    [rule] = objects_of("cpu", "PrometheusRule").values()
    assert rule["spec"] == yaml.safe_load((DEPLOY / "prometheus" / "ddml-alerts.yaml").read_text())


# -- PromQL: only metrics that exist ----------------------------------------------------------------

LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
IDENTIFIER = re.compile(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()")  # not a function call
MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                      "offset", "atan2", "inf", "nan", "Inf", "NaN"})


def promql_names(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """({metric: labels its selectors match on}, labels named in by/without/on/ignoring/group_*)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings hold no names
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges, subqueries, Grafana's [$__rate_interval]
    grouping = {label.strip() for labels in LABEL_LISTS.findall(text) for label in labels.split(",") if label.strip()}
    text = LABEL_LISTS.sub(" ", text)
    metrics: dict[str, set[str]] = {}
    for name, matchers in SELECTOR.findall(text):
        metrics.setdefault(name, set()).update(MATCHER_LABEL.findall(matchers))
    text = re.sub(r"\{[^}]*\}", "", text)
    for name in IDENTIFIER.findall(text):
        if name not in KEYWORDS:
            metrics.setdefault(name, set())
    return metrics, grouping


def test_the_promql_name_check_finds_metrics_and_labels_and_skips_the_rest():
    metrics, grouping = promql_names(
        'histogram_quantile(0.99, sum by (model, le) (rate(ddml_batch_latency_seconds_bucket{outcome!~"ok|{x}"}'
        '[$__rate_interval]))) / on(model) group_left(host) ddml_queue_lenght offset 5m > bool 1e3 '
        'unless max without (state) (ddml_workers{state="idle"}) and $threshold < vector(0)')
    assert metrics == {"ddml_batch_latency_seconds_bucket": {"outcome"}, "ddml_queue_lenght": set(),
                       "ddml_workers": {"state"}}
    assert grouping == {"model", "le", "host", "state"}
    assert "ddml_queue_lenght" not in exported_metrics()  # the check below would fail on this query


@functools.cache
def exported_metrics() -> dict[str, frozenset[str]]:
    """Every series name a real BrokerMetrics and the gateway's metrics expose, with its labels."""
    from broker.metrics import BrokerMetrics
    from broker.stats import BrokerSnapshot, ModelStats
    from gateway.metrics import HTTP_DURATION, HTTP_REQUESTS

    stats = ModelStats()
    stats.outcomes["ok"] += 1
    stats.record_dispatch(1)
    stats.queue_wait.observe(1.0)
    stats.batch_latency.observe(1.0)
    stats.redispatched += 1
    stats.pool_loads[("demand", "ok")] += 1  # pool workers (issue #24): their series appear only with them
    stats.pool_unloads["evicted"] += 1
    stats.load_seconds.observe(1.0)
    stats.cold_start_wait.observe(1.0)
    broker = BrokerMetrics()
    broker.publish(BrokerSnapshot(
        instance_id="i", stats={"malformed": 1}, histograms={"m": stats.histograms()},
        models={"m": {"queued_requests": 1, "queued_items": 2, "oldest_wait_s": 0.5, **stats.describe(),
                      "replicas": {"loaded": 2, "loading": 0, "pool_workers": ["p"]}}},
        workers=[{"worker_id": "w", "host": "h", "device": "cuda:0", "models": ["m"], "state": "busy",
                  "in_flight_items": 2, "last_heartbeat_age_s": 0.1,
                  "stats": {"batches": 1, "items": 2, "mean_batch_latency_ms": 5.0,
                            "cuda_memory_allocated_bytes": 1 << 20}},
                 {"worker_id": "p", "host": "h", "device": "cpu", "models": ["m"], "state": "idle",  # a pool worker
                  "in_flight_items": 0, "last_heartbeat_age_s": 0.1, "pool": {"id": "p", "catalog": ["m"]},
                  "stats": {"pool_loads": 1, "pool_memory_used_mb": 10.0, "pool_memory_budget_mb": 100.0}}]))
    families = list(broker.registry.collect())
    # ddml-gateway always runs in prometheus_client's multiprocess mode, whose /metrics holds only
    # these two: not the default registry's process_* and python_* collectors.
    labels = ("test_deploy", "GET", "200")
    HTTP_REQUESTS.labels(*labels).inc()
    HTTP_DURATION.labels(*labels).observe(0.01)
    try:
        families += [family for metric in (HTTP_REQUESTS, HTTP_DURATION) for family in metric.collect()]
    finally:
        HTTP_REQUESTS.remove(*labels)
        HTTP_DURATION.remove(*labels)
    assert all(family.samples for family in families), [f.name for f in families if not f.samples]
    names: dict[str, set[str]] = {}
    for family in families:
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in names.items()}


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "ddml.json").read_text())


def every_query() -> list[tuple[str, str]]:
    """(where, PromQL) for the dashboard's panels and variables, the KEDA triggers and both alert files."""
    queries = [(f"dashboard panel {p['title']!r}", t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
            assert match, variable  # label_values(series, label): the series is PromQL, the label one of its labels
            queries.append((f"dashboard variable {variable['name']}", f"{match.group(1)} and on({match.group(2)}) vector(1)"))
    for overlay in OVERLAYS:
        for scaled in objects_of(overlay, "ScaledObject").values():
            queries += [(f"{overlay} ScaledObject trigger {t['name']}", t["metadata"]["query"])
                        for t in scaled["spec"]["triggers"]]
        for rule in objects_of(overlay, "PrometheusRule").values():
            queries += [(f"{overlay} PrometheusRule {r['alert']}", r["expr"])
                        for group in rule["spec"]["groups"] for r in group["rules"]]
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "ddml-alerts.yaml").read_text())
    queries += [(f"ddml-alerts.yaml {r['alert']}", r["expr"]) for group in alerts["groups"] for r in group["rules"]]
    return queries


def test_every_promql_query_names_only_metrics_and_labels_the_broker_and_gateway_export():
    exported = exported_metrics()
    assert {"ddml_requests_total", "ddml_batch_size_bucket", "ddml_queue_oldest_wait_seconds", "ddml_workers",
            "ddml_http_requests_total", "ddml_http_request_duration_seconds_bucket"} <= set(exported)
    problems, used = [], set()
    for where, expr in every_query():
        metrics, grouping = promql_names(expr)
        if not metrics:
            problems.append(f"{where}: names no metric: {expr}")
        for name, labels in metrics.items():
            used.add(name)
            if name not in exported:
                problems.append(f"{where}: {name} is not exported by the broker or the gateway")
            elif labels - exported[name] - TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {sorted(labels - exported[name] - TARGET_LABELS)}")
        known = set().union(*(exported.get(name, ()) for name in metrics)) | TARGET_LABELS
        if grouping - known:
            problems.append(f"{where}: groups by labels no metric of it has: {sorted(grouping - known)}")
    assert not problems, "\n".join(problems)
    # The dashboard shows what issue #16 asks for.
    assert {"ddml_http_requests_total", "ddml_requests_total", "ddml_http_request_duration_seconds_bucket",
            "ddml_queue_depth", "ddml_queue_oldest_wait_seconds", "ddml_batch_size_bucket", "ddml_workers"} <= used


BROKER_LABELS = frozenset({"pod", "instance"})  # what tells one broker's series from the other's
PER_WORKER = re.compile(r"ddml_workers$|ddml_worker_")  # every broker reports every worker


def test_queries_aggregate_over_every_broker_and_split_by_broker_where_brokers_differ():
    # KEDA: one figure for all brokers, whichever holds the queue (gateways prefer the first live one,
    # so one usually holds it all and the other reports zeros): the longest wait anywhere, and every
    # input waiting anywhere, since every worker serves every broker. No selector pins a broker.
    for overlay in OVERLAYS:
        [scaled] = objects_of(overlay, "ScaledObject").values()
        queries = {t["name"]: t["metadata"]["query"] for t in scaled["spec"]["triggers"]}
        assert re.fullmatch(r"max\(ddml_queue_oldest_wait_seconds\{[^}]*\}\)", queries["oldest-wait"])
        assert re.fullmatch(r"sum\(ddml_queue_inputs\{[^}]*\}\)", queries["queued-inputs"])
        for query in queries.values():
            for labels in promql_names(query)[0].values():
                assert not labels & (BROKER_LABELS | {"service", "job"}), query
    # The dashboard: per-worker series appear once per broker (under a different worker id each), so
    # every query of them keeps the brokers apart; and some panels show each broker's own traffic.
    per_broker = set()
    for where, expr in every_query():
        metrics, grouping = promql_names(expr)
        if where.startswith("dashboard panel") and grouping & BROKER_LABELS:
            per_broker |= set(metrics)
        if where.startswith("dashboard panel") and any(PER_WORKER.match(name) for name in metrics):
            assert grouping & BROKER_LABELS, f"{where}: counts each worker once per broker: {expr}"
    assert {"ddml_requests_total", "ddml_queue_inputs", "ddml_queue_oldest_wait_seconds", "ddml_workers"} <= per_broker


def test_the_alert_on_a_worker_missing_a_broker_counts_brokers_by_a_series_every_broker_exports():
    from broker.metrics import BrokerMetrics

    [rule] = [r for g in yaml.safe_load((DEPLOY / "prometheus" / "ddml-alerts.yaml").read_text())["groups"]
              for r in g["rules"] if r["alert"] == "DdmlWorkerMissesABroker"]
    assert "count by (namespace) (ddml_malformed_messages_total)" in rule["expr"]
    idle = {sample.name: sample.labels for family in BrokerMetrics().registry.collect() for sample in family.samples}
    assert idle["ddml_malformed_messages_total"] == {}  # a fresh broker, no model, no worker: one series


def test_the_dashboard_is_well_formed():
    board = dashboard()
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert {v["name"] for v in board["templating"]["list"]} >= {"datasource", "namespace", "model"}
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, panel["title"]  # no two panels overlap
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


# -- the README ----------------------------------------------------------------------------------

def test_the_readme_says_how_to_apply_each_overlay_and_names_the_images_and_queries():
    text = README.read_text()
    for overlay in OVERLAYS:
        assert f"kubectl apply -k deploy/kubernetes/overlays/{overlay}" in text
    images = {container(d)["image"] for overlay in OVERLAYS for d in workloads(overlay).values()}
    assert images == {SLIM_IMAGE, WORKER_CPU_IMAGE, WORKER_CUDA_IMAGE}
    for build in (f"docker build --target slim -t {SLIM_IMAGE} .",
                  f"docker build --target worker --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu "
                  f"-t {WORKER_CPU_IMAGE} .",
                  f"docker build --target worker -t {WORKER_CUDA_IMAGE} ."):
        assert build in text
    for overlay in OVERLAYS:
        for scaled in objects_of(overlay, "ScaledObject").values():
            for trigger in scaled["spec"]["triggers"]:
                assert trigger["metadata"]["query"] in text, trigger["name"]
    assert "python deploy/render.py deploy/kubernetes/overlays/" in text


def test_the_readme_status_commands_parse_and_ask_each_broker_with_the_gateways_keys(monkeypatch):
    import shlex

    from gateway.status_cli import build_parser

    for name in [name for name in os.environ if name.startswith("DDML_")]:
        monkeypatch.delenv(name)
    commands = [line.strip() for line in README.read_text().splitlines() if " -- ddml-status " in line]
    gateway = workloads("cpu")["ddml-gateway"]
    frontend = {p["name"]: p["containerPort"] for p in container(workloads("cpu")["ddml-broker"])["ports"]}["frontend"]
    asked = []
    for command in commands:
        kubectl, _, status = command.partition(" -- ")
        assert kubectl == "kubectl -n ddml exec deploy/ddml-gateway", command  # the policy admits gateways only
        args = build_parser().parse_args(shlex.split(status)[1:])
        asked.append(args.broker)
        # With CURVE on (the cpu overlay), the key files a gateway pod mounts and uses.
        assert (args.curve_server_key, args.curve_secret_key) == \
            (flag(gateway, "--curve-server-key"), flag(gateway, "--curve-secret-key")), command
    assert asked == [f"tcp://{name}:{frontend}" for name in broker_names("cpu")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_grace_period_covers_its_prestop_and_the_longest_request(overlay, monkeypatch):
    """gunicorn waits for requests in flight up to the longest deadline plus a margin
    (gateway.config.graceful_timeout_s): with the preStop sleep before it, the pod's grace period
    must cover both, or Kubernetes kills requests that the gateway would have answered."""
    from gateway.config import build_parser, graceful_timeout_s

    for name in [n for n in os.environ if n.startswith("DDML_")]:
        monkeypatch.delenv(name)
    gateway = workloads(overlay)["ddml-gateway"]
    pre_stop = container(gateway)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    graceful_s = graceful_timeout_s(build_parser().parse_args(container(gateway)["args"]))
    assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + graceful_s
