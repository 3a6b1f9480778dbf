"""Drives Python's official `huggingface_hub` client against the zoo's test hub server.

Run by tests/hub_server.rs, with HF_ENDPOINT set to the server and HF_TOKEN to a token:

    hub_python.py upload REPO_ID FOLDER       create REPO_ID (if needed) and upload FOLDER in one commit
    hub_python.py download REPO_ID CACHE_DIR  snapshot_download REPO_ID (main) into the cache CACHE_DIR

Each prints one JSON object on stdout: the commit, and for downloads the snapshot's files with
their SHA-256.
"""

import hashlib
import json
import os
import sys

# The server offers git-LFS "basic" transfers only. With hf_xet installed (a dependency of
# huggingface_hub), upload_folder would go straight to the Xet protocol instead.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import huggingface_hub  # noqa: E402  (configured by the environment above)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upload(repo_id, folder):
    api = huggingface_hub.HfApi()
    api.create_repo(repo_id, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload from huggingface_hub")
    return {"commit": info.oid, "commit_url": info.commit_url}


def download(repo_id, cache_dir):
    snapshot = huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir)
    files = {}
    for root, _, names in os.walk(snapshot):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, snapshot).replace(os.sep, "/")] = sha256_of(path)
    return {"commit": os.path.basename(snapshot), "snapshot": snapshot, "files": files}


def main(argv):
    commands = {"upload": upload, "download": download}
    if len(argv) != 4 or argv[1] not in commands:
        sys.exit(__doc__)
    result = commands[argv[1]](argv[2], argv[3])
    result["huggingface_hub"] = huggingface_hub.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
