"""Check our Label Studio export against a real Label Studio server, through its HTTP API.

What it checks (README, "Where the output lands", Label Studio):

1. ``pro2sam export --format label-studio --local-files-root ROOT`` writes tasks whose images are
   ``/data/local-files/?d=<path under ROOT>`` URLs;
2. Label Studio refuses a "Local files" source storage on ROOT itself, and serves nothing (404)
   until some project has one on a sub-folder holding the images;
3. with such a storage added (and **not** synced) every task's image URL answers 200 with the
   image's bytes, and every imported task keeps its one prediction, box and mask exactly as
   written;
4. Label Studio's own COCO and YOLO exports of brush masks lose the masks (its JSON export keeps
   them);
5. syncing the storage adds one more task per image (duplicates, without predictions).

Label Studio is not a dependency of pro2sam (nor of the test suite, which CI runs without it):
install it in a separate environment, then run this with pro2sam's Python::

    python3 -m venv /tmp/lsvenv && /tmp/lsvenv/bin/pip install 'label-studio==1.23.*'
    pro2sam demo                                   # labels in /tmp/pro2sam-demo/evaluation/labels
    python scripts/check_label_studio.py --label-studio /tmp/lsvenv/bin/label-studio \\
        --labels /tmp/pro2sam-demo/evaluation/labels --root /tmp/pro2sam-demo/data

It starts its own Label Studio (offline, a throw-away data folder, port ``--port``), prints one
line per check and exits 1 if any fails. Needs ``requests``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from urllib.parse import unquote

import requests

EMAIL, PASSWORD = "check@example.com", "check-label-studio-1"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label-studio", required=True, help="the label-studio executable (of its own environment)")
    p.add_argument("--labels", required=True, help="a labels table (folder of Parquet files)")
    p.add_argument("--root", required=True, help="the folder the images' paths are under (LOCAL_FILES_DOCUMENT_ROOT)")
    p.add_argument("--images", default="images", help="the sub-folder of --root the storage is put on (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="Label Studio's port (default: a free one)")
    p.add_argument("--annotate", type=int, default=3, help="tasks whose prediction is saved as an annotation, "
                   "for the export checks (default %(default)s)")  # fmt: skip
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    work = Path(tempfile.mkdtemp(prefix="check-label-studio-"))
    tasks_path = work / "tasks.json"
    subprocess.run(
        [sys.executable, "-m", "pro2sam", "export", "--input", args.labels, "--format", "label-studio",
         "--output", str(tasks_path), "--local-files-root", str(root)],
        check=True,
    )  # fmt: skip
    tasks = json.loads(tasks_path.read_text())
    config = tasks_path.with_suffix(".label_config.xml").read_text()
    outside = [t["data"]["image"] for t in tasks if not t["data"]["image"].startswith("/data/local-files/?d=")]
    if outside:
        raise SystemExit(f"{len(outside)} images are not under --root {root}, e.g. {outside[0]}")
    port = args.port or _free_port()
    server = _start(args.label_studio, root, work / "label-studio", port)
    failures = []

    def check(ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what, flush=True)
        if not ok:
            failures.append(what)

    try:
        base = f"http://127.0.0.1:{port}"
        api = _login(base)
        version = api.get(f"{base}/api/version").json().get("release")
        print(f"Label Studio {version} at {base}, LOCAL_FILES_DOCUMENT_ROOT={root}")
        print(f"ok    the export's {len(tasks)} tasks open their images as /data/local-files/?d=<path under root>")

        project = api.post(f"{base}/api/projects", json={"title": "pro2sam check", "label_config": config})
        project.raise_for_status()
        pid = project.json()["id"]
        imported = api.post(f"{base}/api/projects/{pid}/import", json=tasks)
        imported.raise_for_status()
        ls_tasks = _tasks(api, base, pid)
        check(len(ls_tasks) == len(tasks), f"{len(ls_tasks)} tasks imported of {len(tasks)}")

        first = ls_tasks[0]["data"]["image"]
        check(api.get(base + first).status_code == 404, "without a Local files storage an image URL answers 404")
        on_root = api.post(f"{base}/api/storages/localfiles",
                           json={"project": pid, "path": str(root), "use_blob_urls": True, "title": "root"})  # fmt: skip
        check(on_root.status_code == 400 and "cannot be the same as" in on_root.text,
              f"a storage on the root itself is refused ({on_root.status_code}: "
              f"{_first_error(on_root)[:90]})")  # fmt: skip

        images = root / args.images
        storage = api.post(f"{base}/api/storages/localfiles", json={
            "project": pid, "path": str(images), "use_blob_urls": True, "recursive_scan": True, "title": "images",
        })  # fmt: skip
        check(storage.status_code == 201, f"a storage on {images} is added ({storage.status_code}), not synced")
        served = wrong = 0
        for task in ls_tasks:
            url = task["data"]["image"]
            r = api.get(base + url)
            local = root / unquote(url.split("?d=", 1)[1])
            served += r.status_code == 200
            wrong += r.status_code == 200 and r.content != local.read_bytes()
        check(served == len(ls_tasks) and not wrong,
              f"{served} of {len(ls_tasks)} image URLs answer 200 ({wrong} with other bytes than the file)")  # fmt: skip

        by_id = {t["data"]["image_id"]: t for t in tasks}
        same = sum(_results(t) == _results(by_id[t["data"]["image_id"]]) for t in ls_tasks)
        check(same == len(tasks), f"{same} of {len(tasks)} tasks keep their prediction (box and brush mask) exactly")

        annotated = [t for t in ls_tasks if t.get("predictions")][: args.annotate]
        for t in annotated:
            api.post(f"{base}/api/tasks/{t['id']}/annotations", json={"result": _results(t)}).raise_for_status()
        n = len(annotated)
        exported = api.get(f"{base}/api/projects/{pid}/export", params={"exportType": "JSON"}).json()
        brushes = sum(r["type"] == "brushlabels" for t in exported for a in t["annotations"] for r in a["result"])
        check(brushes == n, f"Label Studio's JSON export keeps the masks ({brushes} brush results of {n} annotations)")
        coco = _zip_json(api.get(f"{base}/api/projects/{pid}/export", params={"exportType": "COCO"}), "result.json")
        segmented = sum(bool(a.get("segmentation")) for a in coco.get("annotations", []))
        check(segmented == 0, f"Label Studio's COCO export loses the masks ({len(coco.get('annotations', []))} "
              f"annotations, {segmented} with a segmentation, of {n} masks)")  # fmt: skip
        yolo = api.get(f"{base}/api/projects/{pid}/export", params={"exportType": "YOLO"})
        polygons = _yolo_polygon_lines(yolo)
        check(polygons == 0, f"Label Studio's YOLO export loses the masks ({polygons} polygon lines of {n} masks)")

        if storage.status_code == 201:
            api.post(f"{base}/api/storages/localfiles/{storage.json()['id']}/sync").raise_for_status()
            after = _tasks(api, base, pid, wait_above=len(tasks))
            files = sum(1 for f in images.rglob("*") if f.is_file())
            bare = sum(not t.get("predictions") for t in after)
            check(len(after) == len(tasks) + files and bare == files,
                  f"syncing the storage makes {len(after) - len(tasks)} more tasks, without predictions ({files} "
                  f"files under {images}): add the storage, do not sync it")  # fmt: skip
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    print(("all checks passed" if not failures else f"{len(failures)} checks failed") + f"; work folder {work}")
    return 1 if failures else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(label_studio: str, root: Path, data: Path, port: int) -> subprocess.Popen:
    """Label Studio on ``port``, offline, serving local files under ``root``; waits until it answers."""
    env = dict(
        os.environ, LATEST_VERSION_CHECK="false", LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
        LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(root), LABEL_STUDIO_BASE_DATA_DIR=str(data),
        LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="false",
    )  # fmt: skip
    data.mkdir(parents=True)
    log = open(data / "server.log", "wb")
    server = subprocess.Popen(
        [label_studio, "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port),
         "--username", EMAIL, "--password", PASSWORD],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 600  # its first start migrates a new database: minutes on a busy machine
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"label-studio exited with {server.returncode}; see {data / 'server.log'}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(2)
    server.terminate()
    raise SystemExit(f"label-studio did not answer within 600 s; see {data / 'server.log'}")


def _login(base: str) -> requests.Session:
    """A session with a personal access token: Label Studio 1.23 disables legacy tokens, so log in,
    make a personal access token (a JWT refresh token) and use an access token from it."""
    web = requests.Session()
    web.get(f"{base}/user/login/")
    web.post(f"{base}/user/login/", headers={"Referer": f"{base}/user/login/"},
             data={"email": EMAIL, "password": PASSWORD, "csrfmiddlewaretoken": web.cookies.get("csrftoken")})  # fmt: skip
    token = web.post(f"{base}/api/token/", headers={"X-CSRFToken": web.cookies.get("csrftoken"), "Referer": base})
    token.raise_for_status()  # 409 on a server where the user has one already: this script starts its own
    access = requests.post(f"{base}/api/token/refresh", json={"refresh": token.json()["token"]})
    access.raise_for_status()
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {access.json()['access']}"
    return api


def _tasks(api: requests.Session, base: str, pid: int, wait_above: int = 0) -> list[dict]:
    """Every task of the project with its predictions (waiting up to a minute for more than ``wait_above``)."""
    for _ in range(30):
        out, page = [], 1
        while True:
            r = api.get(f"{base}/api/tasks", params={"project": pid, "page": page, "page_size": 100, "fields": "all"})
            if r.status_code == 404:
                break
            r.raise_for_status()
            batch = r.json()["tasks"]
            out += batch
            if len(batch) < 100:
                break
            page += 1
        if len(out) > wait_above or not wait_above:
            return out
        time.sleep(2)
    return out


def _results(task: dict) -> list[dict]:
    """A task's prediction results, compared on what they carry (not Label Studio's own fields)."""
    keys = ("id", "type", "from_name", "to_name", "original_width", "original_height", "image_rotation", "value")
    predictions = task.get("predictions") or []
    return [{k: r.get(k) for k in keys} for p in predictions[:1] for r in p["result"]]


def _first_error(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text
    detail = body.get("validation_errors") or body.get("detail") or body
    return json.dumps(detail)


def _zip_json(response: requests.Response, name: str) -> dict:
    response.raise_for_status()
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    with zipfile.ZipFile(io.BytesIO(response.content)) as z:
        member = next(m for m in z.namelist() if m.endswith(name))
        return json.loads(z.read(member))


def _yolo_polygon_lines(response: requests.Response) -> int:
    """Label lines of a YOLO export with more than a box (class + 4 numbers)."""
    response.raise_for_status()
    with zipfile.ZipFile(io.BytesIO(response.content)) as z:
        lines = [line for m in z.namelist() if m.startswith("labels/") and m.endswith(".txt")
                 for line in z.read(m).decode().splitlines() if line.strip()]  # fmt: skip
    return sum(len(line.split()) > 5 for line in lines)


if __name__ == "__main__":
    sys.exit(main())
