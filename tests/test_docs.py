"""The docs site builds with `mkdocs build --strict`, offline, into pages that load nothing from
the internet; and every code block in the docs and the README is a copy of a file that a test
runs (included with pymdownx.snippets, or a verbatim excerpt), or is on a small reviewed list of
text that is shown and not run. The examples under docs/examples/ are run here."""

from __future__ import annotations

import hashlib
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from prefect_raydog import ClusterSpec

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
PAGES = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]

# Files whose copies the docs may show, and the test that runs each (it must name the file).
RUN_BY = {
    "flows/quickstart.py": "tests/test_flows_demo.py",
    "flows/local_platform_demo.py": "tests/test_flows_demo.py",
    "flows/deployment.py": "docs/examples/deploy.sh",
    "flows/prefect.yaml": "docs/examples/deploy.sh",
    **{f"docs/examples/{p.name}": "tests/test_docs.py" for p in EXAMPLES.iterdir()
       if p.suffix in {".py", ".sh", ".toml", ".yaml"}},
}

# Blocks shown and not run, by page and the first 12 hex digits of the block's SHA-256, with the
# reason. A changed block gets a new digest, so it has to be reviewed again.
SHOWN_NOT_RUN = {
    ("README.md", "d0e59e5bc1f3"): "installs the package; tests/test_flows_demo.py runs the "
    "quickstart it ends with",
    ("README.md", "2df2d2ba9c95"): "installs the package and runs the whole suite",
    ("quickstart.md", "d0e59e5bc1f3"): "the README's first command, as above",
    ("deployments.md", "7a7b1bc0d7e8"): "a worker runs until stopped; "
    "tests/test_task_runner_lifecycle.py runs a process worker on a deployment",
    ("deployments.md", "cd7a7b8e93fc"): "serves until stopped",
}

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
            if path not in RUN_BY:
                return f"includes {path}, which is not in RUN_BY"
            if Path(path).name not in (ROOT / RUN_BY[path]).read_text():
                return f"includes {path}, which {RUN_BY[path]} does not run"
            _section(path, snippet["section"])
        return None
    if page.name == "README.md":
        for path in RUN_BY:
            if body in SECTION_MARKER.sub("", (ROOT / path).read_text()):
                return None
    if (page.name, _digest(body)) in SHOWN_NOT_RUN:
        return None
    return f"not a copy of a tested file and not in SHOWN_NOT_RUN (digest {_digest(body)})"


def test_every_code_block_is_a_copy_of_a_tested_file_or_reviewed_text():
    problems, used = [], set()
    for page in PAGES:
        for _info, body in _blocks(page):
            used.add((page.name, _digest(body)))
            if problem := _problem(page, body):
                problems.append(f"{page.relative_to(ROOT)}: {problem}:\n{body}")
    assert not problems, "\n\n".join(problems)
    assert not set(SHOWN_NOT_RUN) - used, f"stale entries: {set(SHOWN_NOT_RUN) - used}"


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


def test_site_builds_strictly_offline_and_loads_nothing_from_the_internet(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "mkdocs", "build", "--strict",
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-5000:]
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
    reference = (site / "reference/builder/index.html").read_text()
    assert 'id="prefect_raydog.RayDogCluster"' in reference


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_python_example_runs(example, prefect_api):
    """Each example runs in this process (Prefect is imported once); the environment variables
    an example sets are put back afterwards."""
    environment = dict(os.environ)
    try:
        runpy.run_path(str(EXAMPLES / example), run_name="__main__")
    finally:
        os.environ.clear()
        os.environ.update(environment)


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.sh")))
def test_shell_example_runs(example, prefect_api):
    """Run from the repository root, as the docs say, with the Prefect API of the test server
    and the key ID that `flows/deployment.py save-blocks` reads."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "YD_API_KEY_ID": "docs-test",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-e", str(EXAMPLES / example)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if example == "deploy.sh":
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("nightly-scoring/nightly-scoring")
        assert deployment.work_pool_name == "raydog-pool"
        assert deployment.entrypoint == "flows/deployment.py:nightly_scoring"


def test_cluster_yaml_is_a_valid_spec():
    """The spec file shown for `prefect-raydog up`."""
    spec = ClusterSpec.model_validate(yaml.safe_load((EXAMPLES / "cluster.yaml").read_text()))
    assert spec.cluster_lifetime == timedelta(hours=2)
    assert [pool.name for pool in spec.worker_pools] == ["cpu"]
