"""The docs site builds with `mkdocs build --strict`, offline, into pages that load nothing from
the internet; every code block in the docs and the README is a copy of a file that a test runs
(included with pymdownx.snippets, or a verbatim excerpt), a command that a test runs verbatim,
output whose every line an example asserts, or on a small reviewed list of text shown and not
run; the examples under docs/examples/ run; and the troubleshooting page lists every message
the package raises."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
import yaml
from prefect.client.orchestration import get_client
from test_deployment_recipe import recipe_commands
from test_readme_commands import readme_commands

from prefect_raydog import ClusterSpec

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
PAGES = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]

# The examples that tests here run (test_python_example_runs, test_shell_example_runs).
RUN_HERE = {f"docs/examples/{p.name}" for p in EXAMPLES.iterdir() if p.suffix in {".py", ".sh"}}
# Other files whose copies the docs may show, and the file that runs each (it names the file).
RUN_BY = {
    "flows/quickstart.py": "tests/test_readme_commands.py",
    "flows/local_platform_demo.py": "tests/test_flows_demo.py",
    "flows/deployment.py": "docs/examples/deploy.sh",
    "flows/prefect.yaml": "docs/examples/deploy.sh",
    "docs/examples/templates.toml": "docs/examples/local_platform.py",
    "docs/examples/builder_templates.toml": "docs/examples/builder.py",
    "docs/examples/cluster.yaml": "tests/test_docs.py",
    "tests/test_cluster_sealed.py": "tests/test_cluster_sealed.py",
    "tests/test_autoscaler.py": "tests/test_autoscaler.py",
    "tests/autoscaler_helpers.py": "tests/test_autoscaler.py",
}

# Output shown as text, by page and the first 12 hex digits of the block's SHA-256, and the
# example that checks it: every line of the block is in that file, which asserts the messages.
OUTPUT_OF = {
    ("blocks.md", "42d6d628a0df"): "docs/examples/block_validation.py",
    ("blocks.md", "40b3f813c821"): "docs/examples/block_validation.py",
}
# Blocks shown and not run, by page and digest, with the reason. A changed block gets a new
# digest, so it has to be reviewed again.
SHOWN_NOT_RUN = {
    ("deployments.md", "21eb2174212a"): "a worker runs until stopped; "
    "tests/test_task_runner_lifecycle.py runs a process worker for a deployment",
    ("deployments.md", "cadf33f43a99"): "serves until stopped",
    ("deployments.md", "97b2806084ba"): "a server until stopped; tests/test_deployment_recipe.py "
    "runs the rest of the recipe against the session's Prefect server instead",
    ("builder.md", "578f1d955070"): "needs SSH to a head node; tests/test_cluster_tunnels.py "
    "drives RayTunnels the same way against a real sshd",
    ("builder.md", "6f72adabb6d1"): "commands against a YellowDog account; "
    "tests/test_cli_clusters.py runs up, status, down and sweep against the local platform, "
    "tests/test_cli_token.py up with --ssh-key and --ssh-known-hosts",
    ("builder.md", "f7a391723eaf"): "the user's own flow; tests/test_cli_token.py runs a flow "
    "with RayDogTaskRunner(address=...) and these two variables after up",
    ("local-platform.md", "02c2444f1a22"): "output of a server in the foreground; "
    "tests/test_local_cli.py checks that it prints the URL, the key and the templates",
    ("architecture.md", "21785ffefde2"): "a diagram of which module imports which, not code",
    ("autoscaler.md", "bad710aceeb3"): "the provider keys of docs/examples/autoscaler-local.yaml, "
    "which tests/test_autoscaler.py runs with ray up and ray down",
    ("autoscaler.md", "4264ba99185b"): "a shell session with a platform in the background; "
    "tests/test_autoscaler.py runs ray up, submit and down on docs/examples/autoscaler-local.yaml",
    ("autoscaler.md", "24cdfee09170"): "a config for a YellowDog account (its templates and "
    "images); the keys are those of docs/examples/autoscaler-local.yaml, which a test runs",
    ("local-platform.md", "0493dff030bb"): "a yellowdog-cli session (installs a package); "
    "tests/test_local_yd_cli.py runs each of these commands against a local platform",
}

# The README's "Try it" commands (repeated in quickstart.md) and what runs each verbatim: the
# test runs its command by construction, .ci/run holds its own copy.
MAIN_COMMAND, TEST_COMMAND = readme_commands()
RUN_VERBATIM = {MAIN_COMMAND: "tests/test_readme_commands.py", TEST_COMMAND: ".ci/run"}
# The deployment recipe's commands but its first, `prefect server start` (in SHOWN_NOT_RUN).
RUN_VERBATIM.update(dict.fromkeys(recipe_commands()[1:], "tests/test_deployment_recipe.py"))

FENCE = re.compile(
    r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)\s*$",
    re.M | re.S,
)
SNIPPET = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"$')
SECTION_MARKER = re.compile(r"^\s*# --8<-- \[(start|end):[\w-]+\]\n", re.M)


def _blocks(page: Path) -> Iterator[tuple[str, str]]:
    for match in FENCE.finditer(page.read_text()):
        body = "\n".join(line[len(match["indent"]):] for line in match["body"].splitlines())
        yield match["info"].strip(), body.strip("\n") + "\n"


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def _section(path: str, section: str | None) -> str:
    text = (ROOT / path).read_text()
    if section is None:
        return text
    found = re.search(rf"# --8<-- \[start:{section}\]\n(.*?)^\s*# --8<-- \[end:{section}\]",
                      text, re.M | re.S)
    assert found, f"{path} has no snippet section {section!r}"
    return found[1]


def _problem(page: Path, body: str) -> str | None:
    """Why this block is neither a copy of a tested file nor on the reviewed list; or None."""
    lines = [line for line in body.splitlines() if line.strip()]
    snippets = [SNIPPET.match(line) for line in lines]
    if all(snippets):
        for snippet in snippets:
            path = snippet["path"]
            if path in RUN_HERE:
                pass
            elif path not in RUN_BY:
                return f"includes {path}, which is neither in RUN_HERE nor in RUN_BY"
            elif path not in (ROOT / RUN_BY[path]).read_text():
                return f"includes {path}, which {RUN_BY[path]} does not name"
            _section(path, snippet["section"])
        return None
    command = body.strip()
    runner = RUN_VERBATIM.get(command)
    if runner and (runner.startswith("tests/") or command in (ROOT / runner).read_text()):
        return None
    if page.name == "README.md":
        for path in sorted(RUN_HERE | set(RUN_BY)):
            if body in SECTION_MARKER.sub("", (ROOT / path).read_text()):
                return None
    if (page.name, _digest(body)) in SHOWN_NOT_RUN:
        return None
    if checker := OUTPUT_OF.get((page.name, _digest(body))):
        checked = (ROOT / checker).read_text()
        missing = [line for line in body.splitlines() if line not in checked]
        return f"lines not checked by {checker}: {missing}" if missing else None
    return f"not a copy of a tested file and not in SHOWN_NOT_RUN (digest {_digest(body)})"


def test_every_code_block_is_a_copy_of_a_tested_file_or_reviewed_text():
    problems, used = [], set()
    for page in PAGES:
        for _info, body in _blocks(page):
            used.add((page.name, _digest(body)))
            if problem := _problem(page, body):
                problems.append(f"{page.relative_to(ROOT)}: {problem}:\n{body}")
    assert not problems, "\n\n".join(problems)
    stale = (set(SHOWN_NOT_RUN) | set(OUTPUT_OF)) - used
    assert not stale, f"stale entries: {stale}"


class _RecordAsserts(ast.NodeTransformer):
    """Follows each `assert` with a line that records it ran."""

    def visit_Assert(self, node: ast.Assert) -> list[ast.stmt]:
        record = ast.parse(f"__asserts_ran__.add({node.lineno})").body[0]
        return [node, ast.copy_location(record, node)]


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_python_example_runs_every_check_it_makes(example, prefect_api):
    """Each example runs in this process (Prefect is imported once), as `__main__`, and checks
    its own results with asserts: it has some, and each of them ran. The environment variables
    an example sets are put back afterwards."""
    path = EXAMPLES / example
    tree = ast.parse(path.read_text())
    asserts = {node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)}
    code = compile(ast.fix_missing_locations(_RecordAsserts().visit(tree)), str(path), "exec")
    ran: set[int] = set()
    environment = dict(os.environ)
    try:
        exec(code, {"__name__": "__main__", "__file__": str(path), "__asserts_ran__": ran})
    finally:
        os.environ.clear()
        os.environ.update(environment)
    assert asserts, f"{example} checks nothing: it has no assert"
    assert ran == asserts, f"asserts of {example} that never ran, by line: {asserts - ran}"


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.sh")))
def test_shell_example_runs(example, prefect_api, platform):
    """Run from the repository root, as the docs say, with the Prefect API of the test server,
    the key ID that `flows/deployment.py save-blocks` reads, and a local platform's URL and key."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "YD_API_KEY_ID": "docs-test",
           "URL": platform.url, "KEY_ID": platform.key_id, "KEY_SECRET": platform.key_secret,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-e", str(EXAMPLES / example)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if example == "deploy.sh":
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("nightly-scoring/nightly-scoring")
        assert deployment.work_pool_name == "raydog-pool"
        assert deployment.entrypoint == "flows/deployment.py:nightly_scoring"
    if example == "local_faults.sh":
        assert json.loads(result.stdout) == {"kind": "429", "path": "/work/requirements",
                                             "method": "POST", "count": 1, "retryAfterSeconds": 2}
        # The fault it added throttles the next submission of a work requirement.
        throttled = requests.post(
            f"{platform.url}/work/requirements", json={},
            headers={"Authorization": f"yd-key {platform.key_id}:{platform.key_secret}"})
        assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "2")


def test_cluster_yaml_is_a_valid_spec():
    """The spec file shown for `prefect-raydog up`."""
    spec = ClusterSpec.model_validate(yaml.safe_load((EXAMPLES / "cluster.yaml").read_text()))
    assert spec.cluster_lifetime == timedelta(hours=2)
    assert [pool.name for pool in spec.worker_pools] == ["cpu"]


class _ExternalLoads(HTMLParser):
    """Collects every resource a page would load from another host."""

    LOADING = {"script": "src", "img": "src", "iframe": "src", "source": "src", "audio": "src",
               "video": "src", "embed": "src", "link": "href"}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        url = values.get(self.LOADING.get(tag, ""))
        if tag == "link" and values.get("rel") in {"canonical", "alternate", "next", "prev"}:
            return
        if url and re.match(r"^(https?:)?//", url):
            self.found.append(f"<{tag}> {url}")


@pytest.fixture(scope="module", autouse=True)
def site_build(tmp_path_factory) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`mkdocs build --strict` in a network namespace of its own (so offline), started when
    this module starts and running while the examples do."""
    site = tmp_path_factory.mktemp("docs") / "site"
    build = subprocess.Popen(
        ["unshare", "--net", sys.executable, "-m", "mkdocs", "build", "--strict",
         "--site-dir", str(site)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    try:
        yield build, site
    finally:
        if build.poll() is None:
            build.kill()
        build.communicate()


def test_site_builds_strictly_offline_and_loads_nothing_from_the_internet(site_build):
    build, site = site_build
    _, errors = build.communicate(timeout=300)
    assert build.returncode == 0, errors[-5000:]
    pages = list(site.rglob("*.html"))
    assert {"index.html", "quickstart/index.html", "reference/builder/index.html"} <= {
        str(p.relative_to(site)) for p in pages}
    external = []
    for page in pages:
        parser = _ExternalLoads()
        parser.feed(page.read_text())
        external += [f"{page.relative_to(site)}: {found}" for found in parser.found]
    for css in site.rglob("*.css"):
        external += [f"{css.relative_to(site)}: {url}"
                     for url in re.findall(r"(?:@import|url\()\s*['\"]?((?:https?:)?//[^'\")]+)",
                                           css.read_text())]
    assert not external, "\n".join(external)
    # Material's script fetches from the internet only for a repository link (GitHub's API), a
    # mermaid diagram (the mermaid library) or a browser without ResizeObserver: no link, no
    # diagram here.
    assert "repo_url" not in (ROOT / "mkdocs.yml").read_text()
    assert not [page for page in pages if 'class="mermaid"' in page.read_text()]
    reference = (site / "reference/builder/index.html").read_text()
    assert 'id="prefect_raydog.RayDogCluster"' in reference


def _message_fragments(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [part.value for part in node.values if isinstance(part, ast.Constant)]
    return []


def test_troubleshooting_lists_every_message_the_package_raises():
    """For each `raise SomeError("message ...")` in the package, the message's longest literal
    part is on the troubleshooting page. Left out: the local platform's state machine, whose
    refusals are YellowDog's API answers (the page describes them together), and
    AttributeErrors."""
    page = " ".join((DOCS / "troubleshooting.md").read_text().split())
    missing = []
    for path in sorted((ROOT / "prefect_raydog").rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[1:2] == ("local",) and "state" in (path.stem, *relative.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                    and node.exc.args) or ast.unparse(node.exc.func) == "AttributeError":
                continue
            parts = [" ".join(part.split()).strip(" ;:.")
                     for part in _message_fragments(node.exc.args[0])]
            longest = max((part for part in parts if len(part) >= 8), key=len, default="")
            if longest and longest not in page:
                missing.append(f"{relative}:{node.lineno}: {longest!r}")
    assert not missing, "\n".join(missing)
