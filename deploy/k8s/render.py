"""Render a kustomization of deploy/k8s without the kustomize binary (the tests use it; so can you).

It implements the part of kustomize these manifests use, and refuses anything else rather than render it wrong:
``resources`` (files and directories holding a kustomization), ``namespace``, ``labels`` (``pairs``,
``includeTemplates``), ``images`` (``name``, ``newName``, ``newTag``) and ``patches`` from files: strategic merge
patches (maps merged, ``null`` deletes, ``containers``/``initContainers``/``env``/``volumes`` merged by ``name``,
other lists replaced) and JSON 6902 patches (``add``, ``replace``, ``remove``) with a ``target`` of ``kind`` and
optional ``name``. ``kustomize build`` gives the same objects.

``python deploy/k8s/render.py deploy/k8s/overlays/prod`` prints the rendered YAML.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
KNOWN_KEYS = {"apiVersion", "kind", "namespace", "resources", "labels", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "StorageClass",
                  "PriorityClass", "IngressClass"}
MERGE_BY_NAME = {"containers", "initContainers", "env", "volumes"}


class RenderError(ValueError):
    """The kustomization uses something this renderer does not implement, or a patch matches nothing."""


def _load_all(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _pod_specs(obj: Obj) -> Iterable[Obj]:
    spec = obj.get("spec", {})
    if obj["kind"] == "Pod":
        yield spec
    elif obj["kind"] == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]
    elif "template" in spec:
        yield spec["template"].get("spec", {})


def merge(base: Any, patch: Any, key: str = "") -> Any:
    """Strategic merge of ``patch`` into ``base`` (the subset described in the module docstring)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if key in MERGE_BY_NAME and isinstance(base, list) and isinstance(patch, list):
        out_list = [copy.deepcopy(item) for item in base]
        names = [item.get("name") for item in out_list]
        for item in patch:
            if item.get("name") in names:
                at = names.index(item["name"])
                out_list[at] = merge(out_list[at], item)
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]


def apply_json6902(obj: Obj, ops: list[Obj]) -> None:
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] in ("add", "replace"):
            if isinstance(node, list):
                if last == "-":
                    node.append(copy.deepcopy(op["value"]))
                elif op["op"] == "add":
                    node.insert(int(last), copy.deepcopy(op["value"]))
                else:
                    node[int(last)] = copy.deepcopy(op["value"])
            else:
                if op["op"] == "replace" and last not in node:
                    raise RenderError(f"replace of missing {op['path']} in {obj['kind']}/{obj['metadata']['name']}")
                node[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            raise RenderError(f"JSON patch op {op['op']!r} is not implemented")


def _identity(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _apply_patch(objects: list[Obj], entry: Obj, directory: Path) -> None:
    if set(entry) - {"path", "target"}:
        raise RenderError(f"patch keys {sorted(set(entry) - {'path', 'target'})} are not implemented")
    docs = _load_all(directory / entry["path"])
    target = entry.get("target")
    if target is not None:
        if set(target) - {"kind", "name"}:
            raise RenderError(f"patch target keys {sorted(set(target))} are not implemented")
        hits = [o for o in objects if o["kind"] == target["kind"] and target.get("name", o["metadata"]["name"])
                == o["metadata"]["name"]]
        if not hits:
            raise RenderError(f"patch {entry['path']} matches nothing")
        for i, obj in enumerate(objects):
            if any(obj is hit for hit in hits):
                if isinstance(docs[0], list):
                    apply_json6902(obj, docs[0])
                else:
                    for doc in docs:
                        objects[i] = obj = merge(obj, doc)
        return
    for doc in docs:
        matches = [i for i, o in enumerate(objects) if _identity(o) == _identity(doc)]
        if not matches:
            raise RenderError(f"patch {entry['path']} ({'/'.join(_identity(doc))}) matches nothing")
        for i in matches:
            objects[i] = merge(objects[i], doc)


def _set_image(container: Obj, images: list[Obj]) -> None:
    image = container["image"]
    name = image.split("@")[0].rsplit(":", 1)[0] if ":" in image.split("/")[-1] else image.split("@")[0]
    for entry in images:
        if entry["name"] == name:
            container["image"] = f"{entry.get('newName', name)}:{entry['newTag']}" if "newTag" in entry \
                else entry.get("newName", name)


def render(directory: Path) -> list[Obj]:
    """The objects ``kustomize build directory`` produces (for the implemented subset)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_KEYS
    if unknown:
        raise RenderError(f"{directory}: kustomization keys {sorted(unknown)} are not implemented")
    objects: list[Obj] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        objects.extend(render(path) if path.is_dir() else _load_all(path))
    for entry in kustomization.get("patches", []):
        _apply_patch(objects, entry, directory)
    for entry in kustomization.get("labels", []):
        if set(entry) - {"pairs", "includeTemplates"}:
            raise RenderError(f"label options {sorted(set(entry))} are not implemented")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
            template = obj.get("spec", {}).get("template") if entry.get("includeTemplates") else None
            if isinstance(template, dict):
                template.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    for obj in objects:
        for pod in _pod_specs(obj):
            for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
                _set_image(container, kustomization.get("images", []))
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = (*_identity(obj), obj["metadata"].get("namespace", ""))
        if key in seen:
            raise RenderError(f"{'/'.join(key)} is defined twice")
        seen.add(key)
    return objects


def main(argv: list[str]) -> int:
    [directory] = argv
    print(yaml.safe_dump_all(render(Path(directory)), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
