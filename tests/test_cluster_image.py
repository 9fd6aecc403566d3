"""cluster/Dockerfile builds the image the cluster templates run, in step with .venv and the Makefile.

No image is built here (no Docker daemon in CI): the file is read and compared with what is installed.
"""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _arg_defaults() -> dict[str, str]:
    """Defaults of the ARGs declared before FROM (the ones the base tag is built from)."""
    defaults = {}
    for word, rest in _instructions():
        if word == "FROM":
            break
        if word == "ARG":
            name, _, value = rest.partition("=")
            defaults[name] = value
    return defaults


def _copy_sources() -> list[str]:
    sources = []
    for word, rest in _instructions():
        if word in ("COPY", "ADD"):
            args = [a for a in rest.split() if not a.startswith("--")]
            sources += args[:-1]
    return sources


def test_base_image_is_rays_own_with_the_installed_ray_and_python():
    args = _arg_defaults()
    assert args["RAY_VERSION"] == ray.__version__
    assert args["PY_TAG"] == f"py{sys.version_info.major}{sys.version_info.minor}"
    assert args["BASE_SUFFIX"] == ""  # the CPU image by default; -gpu is a build arg
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert froms == ["rayproject/ray:${RAY_VERSION}-${PY_TAG}${BASE_SUFFIX}"]
    users = [rest for word, rest in _instructions() if word == "USER"]
    assert users == ["ray"]  # never root


def test_torch_pins_match_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    torch_line = re.search(r"^TORCH\s*:=\s*(.+)$", makefile, re.M).group(1)
    make_pins = dict(re.findall(r"(torch|torchvision)==(\S+)", torch_line))
    assert set(make_pins) == {"torch", "torchvision"}
    docker_pins = re.findall(r"\b(torch|torchvision)==(\S+)", DOCKERFILE.read_text())
    assert docker_pins and {name for name, _ in docker_pins} == {"torch", "torchvision"}
    for name, version in docker_pins:
        assert version == make_pins[name], (name, version, make_pins[name])


def _ignore_rules() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (is_exception, regex) rules, in Docker's syntax (`**`, `*`, `?`, `!`)."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex + r"\Z")))
    return rules


def _ignored(path: str, rules) -> bool:
    """Whether Docker leaves `path` (relative to the context root) out: it or a parent folder matches."""
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        excluded = False
        for negate, regex in rules:
            if regex.match(prefix):
                excluded = not negate
        if excluded:
            return True
    return False


def test_everything_copied_is_in_the_build_context_and_the_wheel_sources_are_copied():
    rules = _ignore_rules()
    sources = [s.rstrip("/") for s in _copy_sources()]
    assert sources
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    tracked = tracked.stdout.splitlines()
    for src in sources:
        assert (REPO / src).exists(), src
        assert not _ignored(src, rules), src
        if (REPO / src).is_dir():  # and no tracked file inside it is left out (e.g. the bundled weights)
            inside = [f for f in tracked if f.startswith(src + "/")]
            assert inside, src
            assert [f for f in inside if _ignored(f, rules)] == [], src
    # what `pip install .` needs: the package folders, the metadata files pyproject names
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], *PYPROJECT["project"]["license-files"]}
    needed |= {d.rstrip("/") for d in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= set(sources), needed - set(sources)
    for out in (".venv", ".git", "test-artifacts", "demo-output", "benchmarks/results", "curate.egg-info"):
        assert _ignored(out, rules), out
    assert _ignored("curate/__pycache__/cli.cpython-311.pyc", rules)
    assert not _ignored("curate/assets/curate-tiny.safetensors", rules)


def _readme_tags() -> dict[str, str]:
    """{image: BASE_SUFFIX} for each `docker build -f cluster/Dockerfile` line in cluster/README.md."""
    tags = {}
    for line in (CLUSTER / "README.md").read_text().splitlines():
        if line.startswith("docker build -f cluster/Dockerfile "):
            suffix = re.search(r"--build-arg BASE_SUFFIX=(\S+)", line)
            tags[re.search(r" -t (\S+) \.", line).group(1)] = suffix.group(1) if suffix else ""
    return tags


def _template_images() -> dict[str, tuple[str, bool]]:
    """{where: (image, needs_gpu)} for every image in both templates."""
    images = {}
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    spec = job["spec"]["rayClusterSpec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        for c in group["template"]["spec"]["containers"]:
            gpu = "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            images[f"kuberay {name}/{c['name']}"] = (c["image"], gpu)
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    default = aws["docker"]["image"]
    for key in ("head_image", "worker_image"):
        assert key not in aws["docker"]  # one default; GPU nodes override per node type
    for name, node in aws["available_node_types"].items():
        image = node.get("docker", {}).get("worker_image", default)
        images[f"aws {name}"] = (image, node["resources"].get("GPU", 0) > 0)
    return images


def test_templates_run_the_images_the_readme_builds():
    built = _readme_tags()
    assert built == {f"REGISTRY/curate:{VERSION}": "", f"REGISTRY/curate:{VERSION}-gpu": "-gpu"}
    readme = (CLUSTER / "README.md").read_text()
    for image in built:
        assert f"docker push {image}" in readme
    images = _template_images()
    assert {"kuberay head/ray-head", "kuberay score/ray-worker", "aws head", "aws gpu_workers"} <= set(images)
    for where, (image, gpu) in images.items():
        assert image in built, (where, image)
        assert (built[image] == "-gpu") == gpu, (where, image)  # CUDA image exactly where GPUs are asked for
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == _arg_defaults()["RAY_VERSION"]


def test_aws_config_is_valid_for_the_installed_ray_launcher():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    jsonschema.validate(aws, schema)
    assert aws["setup_commands"] == []  # the image has curate: nothing is installed on the nodes
