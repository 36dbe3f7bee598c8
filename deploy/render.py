"""Render a kustomization the way `kubectl kustomize` would, for the subset of kustomize that deploy/ uses.

CI has neither kustomize nor kubectl, so tests/unit/test_deploy.py renders every overlay with this
and validates what comes out. It implements only what deploy/kubernetes uses, and refuses anything
else, so a kustomization that grows a field nobody implemented fails the tests instead of being
rendered wrongly:

- `resources`: YAML files (several documents each) inside the kustomization's directory, or
  directories holding a kustomization.yaml (rendered recursively);
- `components`: directories holding a `kind: Component` kustomization; its resources are added,
  then its patches and images apply to everything accumulated so far, as in kustomize;
- `patches`: `path` or inline `patch`, with an optional `target` (group, version, kind, name,
  namespace; exact names, no regular expressions). A patch that is a YAML list is a JSON 6902
  patch (ops add, remove, replace); anything else is a strategic merge patch: maps merge, `null`
  deletes a key, and lists merge by their Kubernetes patch merge key (containers, volumes, env,
  volumeMounts, ports, ...); other lists are replaced. `$patch` and other directives are refused;
- `images`: name, newName, newTag, digest, applied to every `containers` and `initContainers` image.

Stricter than kustomize on purpose: a patch whose target matches nothing, and an image entry that
matches no container, are errors (kustomize passes over them silently).

    python deploy/render.py deploy/kubernetes/overlays/gpu     # prints the YAML that `kubectl apply -k` applies
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

KUSTOMIZATION_FIELDS = frozenset({"apiVersion", "kind", "resources", "components", "patches", "images"})
PATCH_FIELDS = frozenset({"path", "patch", "target"})
TARGET_FIELDS = frozenset({"group", "version", "kind", "name", "namespace"})
IMAGE_FIELDS = frozenset({"name", "newName", "newTag", "digest"})
JSON6902_OPS = frozenset({"add", "remove", "replace"})
KINDS = {"Kustomization": "kustomize.config.k8s.io/v1beta1", "Component": "kustomize.config.k8s.io/v1alpha1"}

# The patch merge keys of the lists this subset merges (from the Kubernetes API types); a list of
# maps under any other field is replaced whole, as kustomize does for a list without a merge key.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "volumes": "name",
    "env": "name", "envFrom": None, "volumeMounts": "mountPath", "imagePullSecrets": "name",
    "hostAliases": "ip", "topologySpreadConstraints": "topologyKey",
}
# Kubernetes' legacy output order (kustomize's default): what others depend on comes first.
ORDER_FIRST = ["Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
               "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
               "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
               "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget"]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]


class KustomizeError(ValueError):
    """The kustomization is wrong, or uses something this renderer does not implement."""


def render(directory: str | Path) -> list[dict]:
    """Every object the kustomization in `directory` produces, in kustomize's legacy order."""
    objects = _build(Path(directory).resolve(), expect="Kustomization", into=[])
    return sorted(objects, key=_order)


def check_kustomization(path: str | Path) -> dict:
    """Parse a kustomization.yaml and refuse any field this renderer does not implement."""
    path = Path(path)
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict):
        raise KustomizeError(f"{path}: not a mapping")
    _only(document, KUSTOMIZATION_FIELDS, f"{path}")
    if KINDS.get(document.get("kind")) != document.get("apiVersion"):
        raise KustomizeError(f"{path}: apiVersion/kind must be one of {KINDS}, got "
                             f"{document.get('apiVersion')}/{document.get('kind')}")
    for index, patch in enumerate(document.get("patches") or []):
        _only(patch, PATCH_FIELDS, f"{path}: patches[{index}]")
        if ("path" in patch) == ("patch" in patch):
            raise KustomizeError(f"{path}: patches[{index}] needs exactly one of path and patch")
        _only(patch.get("target") or {}, TARGET_FIELDS, f"{path}: patches[{index}].target")
    for index, image in enumerate(document.get("images") or []):
        _only(image, IMAGE_FIELDS, f"{path}: images[{index}]")
        if "name" not in image:
            raise KustomizeError(f"{path}: images[{index}] has no name")
    return document


def _only(mapping: dict, allowed: frozenset, where: str) -> None:
    if not isinstance(mapping, dict):
        raise KustomizeError(f"{where}: not a mapping")
    unknown = set(mapping) - allowed
    if unknown:
        raise KustomizeError(f"{where}: {sorted(unknown)} not implemented by deploy/render.py "
                             f"(it implements {sorted(allowed)})")


def _build(directory: Path, expect: str, into: list[dict]) -> list[dict]:
    """Add the kustomization's resources to `into`, apply its components and transformers; return `into`."""
    kustomization = directory / "kustomization.yaml"
    if not kustomization.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    document = check_kustomization(kustomization)
    if document["kind"] != expect:
        raise KustomizeError(f"{kustomization}: expected kind {expect}, got {document['kind']}")
    for entry in document.get("resources") or []:
        location = (directory / entry).resolve()
        if location.is_dir():
            added = _build(location, expect="Kustomization", into=[])
        else:
            added = _load_documents(_inside(directory, entry))
        for obj in added:
            if any(_identity(obj) == _identity(other) for other in into):
                raise KustomizeError(f"{directory}: {_identity(obj)} appears twice")
            into.append(obj)
    for entry in document.get("components") or []:
        _build((directory / entry).resolve(), expect="Component", into=into)
    for patch in document.get("patches") or []:
        _apply_patch(directory, patch, into)
    for image in document.get("images") or []:
        if not _set_images(into, image):
            raise KustomizeError(f"{kustomization}: image {image['name']!r} matches no container")
    return into


def _inside(directory: Path, entry: str) -> Path:
    """A file a kustomization names must lie in its directory (kustomize's default load restrictor)."""
    path = (directory / entry).resolve()
    if directory not in path.parents:
        raise KustomizeError(f"{directory}: {entry} is outside the kustomization's directory")
    if not path.is_file():
        raise KustomizeError(f"{directory}: {entry} does not exist")
    return path


def _load_documents(path: Path) -> list[dict]:
    objects = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for obj in objects:
        if not (isinstance(obj, dict) and obj.get("apiVersion") and obj.get("kind")
                and (obj.get("metadata") or {}).get("name")):
            raise KustomizeError(f"{path}: every document needs apiVersion, kind and metadata.name")
    return objects


def _identity(obj: dict) -> tuple[str, str, str, str]:
    metadata = obj.get("metadata") or {}
    return obj["apiVersion"], obj["kind"], metadata.get("namespace", ""), metadata["name"]


def _order(obj: dict) -> tuple:
    kind = obj["kind"]
    if kind in ORDER_FIRST:
        rank = ORDER_FIRST.index(kind)
    elif kind in ORDER_LAST:
        rank = len(ORDER_FIRST) + 1 + ORDER_LAST.index(kind)
    else:
        rank = len(ORDER_FIRST)
    return (rank, kind, *_identity(obj))


def _apply_patch(directory: Path, entry: dict, objects: list[dict]) -> None:
    where = f"{directory}: patch {entry.get('path') or 'inline'}"
    text = _inside(directory, entry["path"]).read_text() if "path" in entry else entry["patch"]
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(documents) != 1:
        raise KustomizeError(f"{where}: one patch per file or entry, got {len(documents)} documents")
    patch = documents[0]
    target = entry.get("target")
    if isinstance(patch, list):
        if not target:
            raise KustomizeError(f"{where}: a JSON 6902 patch needs a target")
        matched = [obj for obj in objects if _matches(obj, target)]
        for obj in matched:
            _json6902(obj, patch, where)
    elif isinstance(patch, dict):
        if not target:
            metadata = patch.get("metadata") or {}
            group, _, version = patch.get("apiVersion", "").rpartition("/")
            target = {"group": group, "version": version, "kind": patch.get("kind"), "name": metadata.get("name")}
            if metadata.get("namespace"):
                target["namespace"] = metadata["namespace"]
        body = {key: value for key, value in patch.items() if key not in ("apiVersion", "kind")}
        matched = [index for index, obj in enumerate(objects) if _matches(obj, target)]
        for index in matched:
            patched = _strategic_merge(objects[index], body, where)
            patched["metadata"]["name"] = objects[index]["metadata"]["name"]  # a patch never renames
            objects[index] = patched
    else:
        raise KustomizeError(f"{where}: neither a list of operations nor a mapping")
    if not matched:
        raise KustomizeError(f"{where}: its target {target} matches nothing")


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    metadata = obj.get("metadata") or {}
    actual = {"group": group, "version": version, "kind": obj["kind"], "name": metadata.get("name"),
              "namespace": metadata.get("namespace", "")}
    return all(actual[key] == value for key, value in target.items() if key in ("kind", "name", "namespace")
               or (key in ("group", "version") and value))


def _strategic_merge(original, patch, where: str, field: str = ""):
    """`patch` merged into a copy of `original`, as a strategic merge patch (the subset above)."""
    if isinstance(patch, dict):
        directives = [key for key in patch if isinstance(key, str) and key.startswith("$")]
        if directives:
            raise KustomizeError(f"{where}: {directives} not implemented by deploy/render.py")
        merged = copy.deepcopy(original) if isinstance(original, dict) else {}
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = _strategic_merge(merged.get(key), value, where, key)
        return merged
    if isinstance(patch, list):
        original = original if isinstance(original, list) else []
        key = _merge_key(field, original + patch)
        if key is None:
            return [_strategic_merge(None, item, where) for item in patch]
        merged = copy.deepcopy(original)
        for item in patch:
            if key not in item:
                raise KustomizeError(f"{where}: every item of {field} needs its merge key {key!r}")
            index = next((i for i, existing in enumerate(merged) if existing.get(key) == item[key]), None)
            if index is None:
                merged.append(_strategic_merge(None, item, where))
            else:
                merged[index] = _strategic_merge(merged[index], item, where)
        return merged
    return copy.deepcopy(patch)


def _merge_key(field: str, items: list) -> str | None:
    if not items or not all(isinstance(item, dict) for item in items):
        return None  # primitives (args, command) and empty lists: replaced
    if field == "ports":  # a container's ports merge on containerPort, a Service's on port
        return "containerPort" if all("containerPort" in item for item in items) else "port"
    return MERGE_KEYS.get(field)


def _json6902(obj: dict, operations: list, where: str) -> None:
    for operation in operations:
        if not isinstance(operation, dict) or operation.get("op") not in JSON6902_OPS:
            raise KustomizeError(f"{where}: op {operation!r} not implemented (only {sorted(JSON6902_OPS)})")
        path = str(operation.get("path", ""))
        if not path.startswith("/") or (operation["op"] != "remove" and "value" not in operation):
            raise KustomizeError(f"{where}: {operation!r} needs a path from the root, and a value unless it removes")
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in operation["path"].split("/")[1:]]
        parent = obj
        for token in tokens[:-1]:
            parent = _step(parent, token, where, operation)
        last, op = tokens[-1], operation["op"]
        if isinstance(parent, list):
            if last == "-" and op == "add":
                parent.append(copy.deepcopy(operation["value"]))
                continue
            index = _index(parent, last, where, operation, allow_end=op == "add")
            if op == "add":
                parent.insert(index, copy.deepcopy(operation["value"]))
            elif op == "remove":
                del parent[index]
            else:
                parent[index] = copy.deepcopy(operation["value"])
        elif isinstance(parent, dict):
            if op != "add" and last not in parent:
                raise KustomizeError(f"{where}: {operation['path']} does not exist for {op}")
            if op == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(operation["value"])
        else:
            raise KustomizeError(f"{where}: {operation['path']} goes through a scalar")


def _step(node, token: str, where: str, operation: dict):
    if isinstance(node, dict) and token in node:
        return node[token]
    if isinstance(node, list):
        return node[_index(node, token, where, operation, allow_end=False)]
    raise KustomizeError(f"{where}: {operation['path']} does not exist")


def _index(items: list, token: str, where: str, operation: dict, allow_end: bool) -> int:
    if not token.isdigit() or int(token) > len(items) - (0 if allow_end else 1):
        raise KustomizeError(f"{where}: {operation['path']}: no index {token!r} in a list of {len(items)}")
    return int(token)


def _set_images(objects: list[dict], image: dict) -> int:
    """Rewrite every matching container image; return how many matched."""
    count = 0
    for containers in _container_lists(objects):
        for container in containers:
            name, tag, digest = _split_image(container.get("image", ""))
            if name != image["name"]:
                continue
            count += 1
            name = image.get("newName", name)
            if image.get("digest"):
                container["image"] = f"{name}@{image['digest']}"
            elif image.get("newTag"):
                container["image"] = f"{name}:{image['newTag']}"
            else:
                container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    return count


def _container_lists(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield value
            else:
                yield from _container_lists(value)
    elif isinstance(node, list):
        for item in node:
            yield from _container_lists(item)


def _split_image(image: str) -> tuple[str, str, str]:
    """registry:5000/repo/name:tag@sha256:... -> (registry:5000/repo/name, tag, sha256:...)."""
    image, _, digest = image.partition("@")
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1:], digest
    return image, "", digest


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python deploy/render.py KUSTOMIZATION_DIR")
    try:
        objects = render(argv[0])
    except KustomizeError as error:
        raise SystemExit(f"render.py: {error}")
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False, explicit_start=True))


if __name__ == "__main__":
    main()
