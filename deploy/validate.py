"""Checks that every Kubernetes manifest parses and names apiVersion, kind and metadata.name."""
import sys

import yaml

failed = False
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as handle:
        try:
            documents = [d for d in yaml.safe_load_all(handle) if d is not None]
        except yaml.YAMLError as error:
            print(f"{path}: {error}")
            failed = True
            continue
    for index, document in enumerate(documents):
        for key in ("apiVersion", "kind"):
            if key not in document:
                print(f"{path}: document {index + 1}: missing {key}")
                failed = True
        if not document.get("metadata", {}).get("name"):
            print(f"{path}: document {index + 1}: missing metadata.name")
            failed = True
    print(f"{path}: {len(documents)} documents ok")
sys.exit(1 if failed else 0)
