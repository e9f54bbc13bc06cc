"""Shared test fixtures."""

import pytest


@pytest.fixture(scope="session")
def tiny_sam():
    """The seeded random-weight tiny SAM (256 px input, 16x16 embedding, 64x64 low-res masks).

    Shared by the whole session: treat it as read-only.
    """
    from pro2sam.sam import build_sam

    return build_sam("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """(GTFormer export folder, tiny SAM .pth) written to disk, random weights, 3 classes."""
    from helpers import make_tiny_checkpoints

    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on 127.0.0.1 at a free port, for the whole session.

    The AWS_* variables are set in this process before any Ray is started, so Ray workers and
    subprocesses inherit them. Yields the endpoint URL.
    """
    import os

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    server._server.app = _S3_REQUESTS.wrap(server._server.app)  # werkzeug's server calls .app per request
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class S3RequestLog:
    """The requests an S3 server answers: (method, path, query, Range header) each, in order."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str, str | None]] = []

    def wrap(self, app):
        def logged(environ, start_response):
            self.requests.append(
                (environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""), environ.get("HTTP_RANGE"))
            )
            return app(environ, start_response)

        return logged


_S3_REQUESTS = S3RequestLog()


@pytest.fixture
def s3_requests(s3_server) -> S3RequestLog:
    """The session S3 server's request log, emptied for this test."""
    _S3_REQUESTS.requests.clear()
    return _S3_REQUESTS


_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")


@pytest.fixture
def s3_bucket(s3_server):
    """A new empty bucket on the session's S3 server; yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray (4 logical CPUs) for in-process jobs, shared by the session.

    Depends on the S3 server so that its workers see the AWS_* settings. Its workers' and
    raylet's log lines are not sent to this process (``log_to_driver=False``): the session's
    Ray outlives every test that starts it, and a line it prints later (a raylet's disk-space
    warning, say) would land in another test's captured stderr.
    """
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _checkpoint_cache(tmp_path_factory):
    """Remote checkpoints fetched during the tests are cached under the session's tmp, not ~/.cache.

    Autouse, so it is set before any Ray starts and its workers inherit it.
    """
    import os

    saved = os.environ.get("PRO2SAM_CACHE")
    os.environ["PRO2SAM_CACHE"] = str(tmp_path_factory.mktemp("pro2sam_cache"))
    yield
    if saved is None:
        os.environ.pop("PRO2SAM_CACHE", None)
    else:
        os.environ["PRO2SAM_CACHE"] = saved


# Fixtures and calls that start Ray or a subprocess: the tests that use them are marked `slow`,
# so that `pytest -m "not slow"` is a fast inner loop (CI and the README's command run everything).
_SLOW_FIXTURES = {"ray_local", "tiny_demo", "tuned_on_manifest"}
_SLOW_CALLS = ("subprocess", "Popen", "cli_label_args", "local_ray_cluster", "run_captured", "ray.init")


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        function = getattr(item, "function", None)
        try:
            source = inspect.getsource(function) if function is not None else ""
        except (OSError, TypeError):
            source = ""
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or any(call in source for call in _SLOW_CALLS):
            item.add_marker(pytest.mark.slow)
