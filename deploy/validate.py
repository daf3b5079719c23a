"""Checks the deployment files.

    python3 deploy/validate.py deploy/k8s/*.yaml

Every Kubernetes manifest given must parse and name apiVersion, kind and metadata.name. Beside
them (found from this file's place in the repository) it checks what a user of the files would
otherwise find out the hard way:

- deploy/Dockerfile: every base image pinned to an exact version (or a digest); a .dockerignore
  that keeps target/ and .git out of the build context;
- docker-compose.yml: no obsolete `version:` key; every image pinned; every dagmq service
  reads its DAG files from a mounted directory (the user's), and its image from DAGMQ_IMAGE;
- deploy/k8s: no `:latest` image and the dagmq image set through kustomization.yaml's `images`;
  the DAG files from a ConfigMap mounted where DAGMQ_DAGS points; a KEDA ScaledObject for each
  worker Deployment, scaling on every pool it consumes, counting unacknowledged messages
  (protocol http) over an https:// management URL, with the private CA given and used
  (`tls: enable`).

deploy/validate_test.py checks that each of the KEDA checks finds what it is for.

Exits 1, naming each problem, if any check fails.
"""
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def pinned(image):
    """Whether an image reference names an exact version (a tag with a dotted version) or a digest."""
    if "@sha256:" in image:
        return True
    tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
    return bool(re.match(r"^\d+\.\d+(\.\d+)?([.-].*)?$", tag))


def check_manifests(paths):
    documents = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            try:
                docs = [d for d in yaml.safe_load_all(handle) if d is not None]
            except yaml.YAMLError as error:
                problem(path, error)
                continue
        for index, document in enumerate(docs):
            for key in ("apiVersion", "kind"):
                if key not in document:
                    problem(path, f"document {index + 1}: missing {key}")
            if not document.get("metadata", {}).get("name"):
                problem(path, f"document {index + 1}: missing metadata.name")
            documents.append((path, document))
        print(f"{path}: {len(docs)} documents parsed")
    return documents


def check_dockerfile():
    path = os.path.join(ROOT, "deploy/Dockerfile")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            match = re.match(r"^\s*FROM\s+(\S+)", line, re.I)
            if match and not pinned(match.group(1)):
                problem(f"{path}:{number}", f"base image {match.group(1)} is not pinned to an exact version")
    ignore = os.path.join(ROOT, ".dockerignore")
    entries = open(ignore, encoding="utf-8").read().split() if os.path.exists(ignore) else []
    for needed in ("target/", ".git/"):
        if needed not in entries:
            problem(ignore, f"does not keep {needed} out of the build context")


def check_compose():
    path = os.path.join(ROOT, "docker-compose.yml")
    with open(path, encoding="utf-8") as handle:
        compose = yaml.safe_load(handle)
    if "version" in compose:
        problem(path, "the top-level `version:` key is obsolete")
    for name, service in compose.get("services", {}).items():
        image = service.get("image", "")
        if image.startswith("${DAGMQ_IMAGE"):
            command = service.get("command", [])
            if not any(v.endswith(":/etc/dagmq/dags:ro") and "DAGMQ_DAGS_DIR" in v for v in service.get("volumes", [])):
                problem(path, f"service {name} ({' '.join(command)}) does not mount the user's DAG directory")
        elif "dagmq" in image:
            problem(path, f"service {name}: image {image} is not DAGMQ_IMAGE")
        elif image and not pinned(image):
            problem(path, f"service {name}: image {image} is not pinned to an exact version")


def check_k8s(documents):
    k8s = os.path.join(ROOT, "deploy/k8s")
    kustomization_path = os.path.join(k8s, "kustomization.yaml")
    kustomization = yaml.safe_load(open(kustomization_path, encoding="utf-8")) if os.path.exists(kustomization_path) else {}
    if not any(i.get("name") == "dagmq" and i.get("newName") for i in kustomization.get("images", [])):
        problem(kustomization_path, "sets no image for `dagmq` (images: name dagmq, newName REGISTRY/dagmq)")
    generated = {g.get("name") for g in kustomization.get("configMapGenerator", [])}
    for file in (f for g in kustomization.get("configMapGenerator", []) for f in g.get("files", [])):
        if not os.path.exists(os.path.join(k8s, file)):
            problem(kustomization_path, f"configMapGenerator file {file} does not exist")
    worker_pools = {}  # worker Deployment name -> the pools it consumes
    for path, document in documents:
        if document.get("kind") != "Deployment":
            continue
        spec = document["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec.get("containers", []):
            image = container.get("image", "")
            if image.endswith(":latest") or (image != "dagmq" and not pinned(image)):
                problem(path, f"container {container['name']}: image {image} (use `dagmq`, set by kustomization.yaml)")
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            dags = env.get("DAGMQ_DAGS")
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            source = volumes.get(mounts.get(dags, ""), {}).get("configMap", {}).get("name")
            if not dags or source not in generated:
                problem(path, f"container {container['name']}: DAGMQ_DAGS is not a mounted ConfigMap of kustomization.yaml")
            args = container.get("args", [])
            if args[:1] == ["worker"]:
                queues = args[args.index("--queues") + 1] if "--queues" in args else "default"
                worker_pools[document["metadata"]["name"]] = {q.strip() for q in queues.split(",")}
    scaled = [d for _, d in documents if d.get("kind") == "ScaledObject"]
    auths = {d["metadata"]["name"]: d for _, d in documents if d.get("kind") == "TriggerAuthentication"}
    secrets = {d["metadata"]["name"]: {**d.get("data", {}), **d.get("stringData", {})} for _, d in documents if d.get("kind") == "Secret"}
    # Every worker Deployment is scaled by a ScaledObject of its own, on every pool it consumes.
    targets = {obj["spec"].get("scaleTargetRef", {}).get("name"): obj for obj in scaled}
    for name, consumed in sorted(worker_pools.items()):
        obj = targets.get(name)
        if obj is None:
            problem("deploy/k8s", f"no KEDA ScaledObject scales the worker Deployment {name}")
            continue
        triggers = [t for t in obj["spec"].get("triggers", []) if t.get("type") == "rabbitmq"]
        pools = {t["metadata"].get("queueName", "").removeprefix("dagmq.tasks.") for t in triggers}
        if pools != consumed:
            problem("deploy/k8s/keda.yaml", f"{name} scales on pools {sorted(pools)}, it consumes {sorted(consumed)}")
        for trigger in triggers:
            queue = trigger["metadata"].get("queueName")
            if trigger["metadata"].get("protocol") != "http":
                problem("deploy/k8s/keda.yaml", f"{queue}: protocol amqp counts no unacknowledged message")
            auth = auths.get(trigger.get("authenticationRef", {}).get("name", ""), {})
            refs = {p["parameter"]: p for p in auth.get("spec", {}).get("secretTargetRef", [])}
            if "ca" not in refs:
                problem("deploy/k8s/keda.yaml", f"{queue}: KEDA is given no CA for a broker behind a private CA")
            # The CA is used only with `tls: enable`, and the host must be an https:// one.
            tls = refs.get("tls")
            if tls is None or secrets.get(tls["name"], {}).get(tls["key"]) != "enable":
                problem("deploy/k8s/keda.yaml", f"{queue}: KEDA's tls parameter is not `enable`, so the CA is not used")
            host = refs.get("host")
            url = secrets.get(host["name"], {}).get(host["key"], "") if host else ""
            if not url.startswith("https://"):
                problem("deploy/k8s/keda.yaml", f"{queue}: the management URL {url!r} is not https://")
    for name in sorted(set(targets) - set(worker_pools)):
        problem("deploy/k8s/keda.yaml", f"ScaledObject scales {name}, which is no worker Deployment")


def main():
    documents = check_manifests(sys.argv[1:])
    check_dockerfile()
    check_compose()
    check_k8s(documents)
    for line in problems:
        print(line)
    print("deployment files ok" if not problems else f"{len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
