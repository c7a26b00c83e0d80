"""Static checks over the service's own source (app/ and workers/): nothing a client sends is ever
unpickled, and the server has no way to fetch a URL a client gives it (CVE-2023-43654, CVE-2024-37052
and siblings, CVE-2025-32434). Plus the API's surface: no endpoint takes a URL or a weights file."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

SOURCES = sorted(p for folder in ("app", "workers") for p in (REPO / folder).rglob("*.py"))

# Deserialisers that run code, and every client that can fetch a URL.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
FETCHING_MODULES = {"urllib.request", "urllib3", "requests", "httpx", "aiohttp", "http.client", "ftplib", "pycurl"}
# The one exception: webhook deliveries go to the URLs tenants registered, after its own SSRF
# checks (tests/webhooks). It never fetches a file for the server to load.
WEBHOOK_SENDER = REPO / "app" / "webhooks" / "sender.py"
# And one install-time tool, run by `make install` and the Dockerfile, never imported by the server:
# it fetches the console's pinned charting library from the npm registry and checks its hash.
CONSOLE_VENDOR = REPO / "app" / "console" / "vendor.py"
FETCHING_CALLS = {"hf_hub_download", "snapshot_download", "urlopen", "download_url_to_file", "load_state_dict_from_url"}


def trees() -> list[tuple[Path, ast.AST]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in SOURCES]


def imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    def called(node: ast.Call) -> str | None:
        func = node.func
        return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None

    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and called(node) == name]


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_sources_were_found():
    assert len(SOURCES) > 30 and any(p.name == "main.py" for p in SOURCES)


@pytest.mark.parametrize("path,tree", trees(), ids=[str(p.relative_to(REPO)) for p in SOURCES])
def test_nothing_is_unpickled_and_no_url_is_fetched(path, tree):
    modules = imported_modules(tree)
    assert not modules & UNSAFE_MODULES, f"{path}: imports a code-running deserialiser"
    if path not in (WEBHOOK_SENDER, CONSOLE_VENDOR):
        assert not {m for m in modules if any(m == f or m.startswith(f + ".") for f in FETCHING_MODULES)}, (
            f"{path}: imports an HTTP client"
        )
    for name in FETCHING_CALLS - ({"urlopen"} if path == CONSOLE_VENDOR else set()):
        assert not calls(tree, name), f"{path}: calls {name}"
    for call in calls(tree, "load"):
        if isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", None) == "torch":
            assert keyword(call, "weights_only") is True, f"{path}:{call.lineno}: torch.load without weights_only=True"
    for call in calls(tree, "save_for_hf"):
        assert keyword(call, "safe_serialization") is True, f"{path}:{call.lineno}: artifacts must be safetensors"
    for call in calls(tree, "create_model"):
        # pretrained weights only from a file the server chose (its weights directory or its own
        # artifacts), never through timm's download path
        if keyword(call, "pretrained") is True:
            local_dir = isinstance(call.args[0], ast.JoinedStr) and call.args[0].values[0].value == "local-dir:"
            assert local_dir or keyword(call, "pretrained_cfg_overlay") is not None, f"{path}:{call.lineno}: may download"


def test_the_checks_catch_what_they_look_for():
    """The scanner above is not vacuous: it flags each pattern in a sample."""
    sample = ast.parse(
        "import pickle\nimport httpx\nfrom urllib.request import urlopen\nimport torch\n"
        "torch.load(f)\nurlopen(u)\n"
    )
    assert {"pickle", "httpx", "urllib.request"} <= imported_modules(sample)
    assert len(calls(sample, "load")) == 1 and keyword(calls(sample, "load")[0], "weights_only") is None
    assert len(calls(sample, "urlopen")) == 1


def test_the_server_never_imports_the_install_time_fetcher():
    importers = [path for path, tree in trees() if "app.console.vendor" in imported_modules(tree)]
    assert importers == [], importers


def test_celery_accepts_json_only():
    from app.core.broker import make_celery
    from app.core.config import Settings

    conf = make_celery(Settings(broker_url="memory://")).conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json" and conf.result_serializer == "json"


def test_no_endpoint_takes_a_url_or_weights(client):
    """Every parameter and request body property in the OpenAPI document: none is a URL, none a
    weights file. The only binary inputs are the dataset archive and the images to predict on."""
    schema = client.app.openapi()
    names, binaries = [], []

    def walk(node, where):
        if isinstance(node, dict):
            if "$ref" in node:  # a request model: follow it into components
                walk(schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]], where)
            for key, value in node.get("properties", {}).items():
                names.append(key)
                if value.get("format") == "binary" or value.get("items", {}).get("format") == "binary":
                    binaries.append((where, key))
            if node.get("format") == "uri":
                names.append(f"{where}: format uri")
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    for template, operations in schema["paths"].items():
        for method, operation in operations.items():
            names.extend(p["name"] for p in operation.get("parameters", []))
            if (method, template) == ("post", "/v1/webhooks"):
                continue  # the one URL the API takes: where deliveries are sent (never read back or loaded)
            walk(operation.get("requestBody", {}), f"{method.upper()} {template}")
    assert set(schema["components"]["schemas"]["WebhookCreate"]["properties"]) == {"url", "events", "description"}
    assert {"dataset_id", "backbone", "lr", "images", "scopes"} <= set(names)  # bodies were followed
    assert not [n for n in names if "url" in n.lower() or "uri" in n.lower() or "weights" in n.lower()]
    assert sorted(binaries) == [
        ("POST /v1/datasets", "file"),
        ("POST /v1/models/{model_id}/embed", "files"),
        ("POST /v1/models/{model_id}/predict", "files"),
    ]
