"""Checks that deploy/validate.py's KEDA checks find what they are for: each case breaks the
shipped manifests in one way and expects exactly the problem it names.

    python3 deploy/validate_test.py
"""
import copy
import glob
import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ beside the deployment files
import validate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def problems_of(change):
    """The problems check_k8s finds in the shipped manifests after `change(documents)`."""
    documents = copy.deepcopy(shipped)
    change(documents)
    validate.problems.clear()
    validate.check_k8s(documents)
    return list(validate.problems)


def find(documents, kind, name=None):
    return next(d for _, d in documents if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name))


def second_worker(documents):
    worker = copy.deepcopy(find(documents, "Deployment", "dagmq-worker"))
    worker["metadata"]["name"] = "dagmq-worker-gpu"
    args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    worker["spec"]["template"]["spec"]["containers"][0]["args"] = [a for a in args if a != "--queues"][:1] + ["--queues", "gpu"]
    documents.append(("deploy/k8s/worker-gpu.yaml", worker))


def secret_value(key, value):
    def change(documents):
        for _, d in documents:
            if d.get("kind") == "Secret" and key in d.get("stringData", {}):
                d["stringData"][key] = value
    return change


def trigger_auth_without(parameter):
    def change(documents):
        auth = find(documents, "TriggerAuthentication")
        auth["spec"]["secretTargetRef"] = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] != parameter]
    return change


def protocol_amqp(documents):
    find(documents, "ScaledObject")["spec"]["triggers"][0]["metadata"]["protocol"] = "amqp"


def other_pool(documents):
    find(documents, "ScaledObject")["spec"]["triggers"][0]["metadata"]["queueName"] = "dagmq.tasks.other"


CASES = [
    ("a second worker Deployment with no ScaledObject", second_worker,
     ["deploy/k8s: no KEDA ScaledObject scales the worker Deployment dagmq-worker-gpu"]),
    ("a ScaledObject on another pool", other_pool,
     ["deploy/k8s/keda.yaml: dagmq-worker scales on pools ['other'], it consumes ['default']"]),
    ("protocol amqp", protocol_amqp,
     ["deploy/k8s/keda.yaml: dagmq.tasks.default: protocol amqp counts no unacknowledged message"]),
    ("no CA", trigger_auth_without("ca"),
     ["deploy/k8s/keda.yaml: dagmq.tasks.default: KEDA is given no CA for a broker behind a private CA"]),
    ("tls not enabled", secret_value("keda-tls", "disable"),
     ["deploy/k8s/keda.yaml: dagmq.tasks.default: KEDA's tls parameter is not `enable`, so the CA is not used"]),
    ("a plain http management URL", secret_value("management-url", "http://dagmq:x@rabbitmq:15672/dagmq"),
     ["deploy/k8s/keda.yaml: dagmq.tasks.default: the management URL 'http://dagmq:x@rabbitmq:15672/dagmq' is not https://"]),
]

shipped = validate.check_manifests(sorted(glob.glob(os.path.join(HERE, "k8s", "*.yaml"))))
failures = []
if problems_of(lambda documents: None) != []:
    failures.append(f"the shipped manifests: {validate.problems}")
for name, change, expected in CASES:
    found = problems_of(change)
    if found != expected:
        failures.append(f"{name}: expected {expected}, found {found}")
for failure in failures:
    print(failure)
print(f"{len(CASES)} KEDA cases ok" if not failures else f"{len(failures)} of {len(CASES) + 1} cases failed")
sys.exit(1 if failures else 0)
