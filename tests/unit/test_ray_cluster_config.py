"""ray_cluster.yaml, the Ray cluster-launcher config: Ray's own validation, offline, plus the parts this
project depends on (the custom resources actors are pinned with, the GPU type scaling from zero, and every
node installing torch==2.13.0 before the project, under constraints.txt, like scripts/install.sh).

Nothing here talks to AWS: the config goes through prepare_config (defaults merged, setup commands merged,
min/max workers filled: what `ray up` does before the provider's bootstrap) and validate_config (the
ray-schema.json check plus Ray's cross-field checks), never through the provider's bootstrap_config.
"""

import copy
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")  # ray[default] brings it; validate_config needs it
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "ray_cluster.yaml"
INSTALL_SH = ROOT / "scripts" / "install.sh"
CONSTRAINTS = ROOT / "constraints.txt"

# The custom resources the project's actors are pinned with: @ray.remote(resources={NAME: 1}).
ANNOTATOR, SCORER, TRAINER_GPU = "annotator", "scorer", "trainer_gpu"
CUSTOM = (ANNOTATOR, SCORER, TRAINER_GPU)
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
ENV_FILE = "~/.freeal-stream.env"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return prepare_config(copy.deepcopy(raw))


def node_types(cfg):
    return cfg["available_node_types"]


def gpu_types(cfg):
    return [n for n, t in node_types(cfg).items() if t["resources"].get("GPU", 0) > 0]


def cpu_worker_types(cfg):
    return [n for n, t in node_types(cfg).items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) == 0]


def setup_commands_of(prepared, name):
    """The setup commands a node of this type runs, resolved as Ray does: the head runs setup_commands +
    head_setup_commands; a worker runs its type's own worker_setup_commands if it has them (they replace
    the merged global list), else setup_commands + worker_setup_commands."""
    if name == prepared["head_node_type"]:
        return prepared["head_setup_commands"]
    return node_types(prepared)[name].get("worker_setup_commands", prepared["worker_setup_commands"])


def pip_install_argv(cmd):
    """The arguments after `pip install` in a command, or None if it installs nothing."""
    words = shlex.split(cmd)
    for i in range(len(words) - 1):
        if words[i] == "pip" and words[i + 1] == "install":
            end = next((j for j in range(i + 2, len(words)) if words[j] in ("&&", ";", "||")), len(words))
            return words[i + 2 : end]
    return None


def requirements(argv):
    """The requirement arguments of a pip install (options and their values left out)."""
    takes_value = {
        "-c",
        "--constraint",
        "-r",
        "--requirement",
        "-i",
        "--index-url",
        "--extra-index-url",
        "-f",
        "--find-links",
        "-e",
        "--editable",
    }
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in takes_value:
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def install_sh():
    text = INSTALL_SH.read_text()
    extras = re.search(r'-e\s+"([^"]+)"', text).group(1)
    models = re.findall(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.]+", text.split("--no-deps", 1)[1])
    return extras, models


def torch_pin():
    return re.search(r"^torch==(\S+)", CONSTRAINTS.read_text(), re.M).group(1)


# ---- Ray's own validation -------------------------------------------------------------------------------


def test_file_as_written_passes_ray_validation(raw):
    validate_config(copy.deepcopy(raw))


def test_prepared_config_passes_ray_validation(raw, prepared):
    validate_config(copy.deepcopy(prepared))
    assert prepared["provider"]["type"] == "aws"
    assert node_types(prepared)[raw["head_node_type"]]["max_workers"] == 0
    # Every command list is the file's own: nothing from Ray's AWS defaults.yaml (its conda PATH and
    # nightly-wheel install) leaks in.
    lists = [
        prepared[k]
        for k in (
            "head_setup_commands",
            "worker_setup_commands",
            "head_start_ray_commands",
            "worker_start_ray_commands",
        )
    ]
    lists += [setup_commands_of(prepared, n) for n in node_types(prepared)]
    for cmd in (c for cmds in lists for c in cmds):
        assert "anaconda" not in cmd and "ray-wheels" not in cmd, cmd


BROKEN = {
    "unknown top-level key": (
        lambda c: c.update(head_nodes={"InstanceType": "m6i.xlarge"}),
        jsonschema.ValidationError,
    ),
    "max_workers not an integer": (lambda c: c.update(max_workers="five"), jsonschema.ValidationError),
    "setup_commands not a list": (
        lambda c: c.update(setup_commands="bash scripts/install.sh"),
        jsonschema.ValidationError,
    ),
    "unknown key in a node type": (
        lambda c: node_types(c)["gpu_worker"].update(min_worker=0),
        jsonschema.ValidationError,
    ),
    "fractional custom resource": (
        lambda c: node_types(c)["cpu_worker"]["resources"].update(scorer=0.5),
        jsonschema.ValidationError,
    ),
    "node type without resources": (lambda c: node_types(c)["cpu_worker"].pop("resources"), jsonschema.ValidationError),
    "head type not among the node types": (lambda c: c.update(head_node_type="head"), ValueError),
    "min_workers above max_workers": (lambda c: node_types(c)["cpu_worker"].update(min_workers=99), ValueError),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_copy_fails_validation(raw, case):
    mutate, error = BROKEN[case]
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises(error):
        validate_config(broken)


# ---- what the project needs from the cluster -----------------------------------------------------------


def test_node_types_carry_the_resources_actors_are_pinned_with(raw):
    head = node_types(raw)[raw["head_node_type"]]
    assert not set(CUSTOM) & set(head["resources"]), "pinned actors must not land on the head"

    cpu = cpu_worker_types(raw)
    assert cpu, "no CPU worker type"
    for name in cpu:
        res = node_types(raw)[name]["resources"]
        assert res.get(ANNOTATOR) == 4 and res.get(SCORER) == 1, (name, res)
        assert TRAINER_GPU not in res, name

    gpu = gpu_types(raw)
    assert len(gpu) == 1, gpu
    t = node_types(raw)[gpu[0]]
    assert t["resources"].get(TRAINER_GPU) == 1 and t["resources"]["GPU"] >= 1, t["resources"]
    assert not {ANNOTATOR, SCORER} & set(t["resources"]), "annotators/scorers belong on CPU workers"
    assert t["min_workers"] == 0, "the GPU node is optional: it starts only when the trainer asks for it"
    assert t.get("max_workers", raw["max_workers"]) >= 1


def test_worker_start_command_leaves_resources_to_the_node_types(raw):
    # worker_start_ray_commands is shared by all worker types, so a --resources flag there would give the
    # GPU node annotator slots too; each type's `resources` reaches `ray start` via RAY_OVERRIDE_RESOURCES.
    start = " ; ".join(raw["worker_start_ray_commands"])
    assert "--resources" not in start
    assert re.search(r"ray start --address=\$RAY_HEAD_IP:6379\b", start), start
    assert start.index("ray stop") < start.index("ray start")
    head = " ; ".join(raw["head_start_ray_commands"])
    assert re.search(r"ray start --head --port=6379\b", head) and head.index("ray stop") < head.index("ray start")
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert cmd.startswith(f". {ENV_FILE};"), f"Ray must start with the project's env: {cmd}"


@pytest.mark.parametrize("kind", ["head", "cpu", "gpu"])
def test_setup_installs_torch_first_then_the_project_under_constraints(prepared, kind):
    names = {"head": [prepared["head_node_type"]], "cpu": cpu_worker_types(prepared), "gpu": gpu_types(prepared)}[kind]
    extras, models = install_sh()
    pin = torch_pin()
    assert pin == "2.13.0"
    for name in names:
        cmds = setup_commands_of(prepared, name)
        installs = [(i, pip_install_argv(c)) for i, c in enumerate(cmds)]
        installs = [(i, a) for i, a in installs if a is not None]
        assert installs, name
        first_i, first = installs[0]
        assert requirements(first) == [f"torch=={pin}"], f"{name}: torch must be installed first: {first}"
        venv_i = next(i for i, c in enumerate(cmds) if "-m venv .venv" in c)
        assert venv_i < first_i, name
        if kind == "gpu":
            assert not any("download.pytorch.org/whl/cpu" in a for a in first), "GPU node needs a CUDA torch"
        else:
            assert "--index-url" in first and first[first.index("--index-url") + 1] == CPU_TORCH_INDEX, (
                f"{name}: not the CPU wheel: {first}"
            )

        project = [(i, a) for i, a in installs if "-e" in a]
        assert len(project) == 1, name
        proj_i, proj = project[0]
        assert proj_i > first_i and proj[proj.index("-e") + 1] == extras, (name, proj)
        for i, argv in installs[1:]:
            assert "-c" in argv and argv[argv.index("-c") + 1] == "constraints.txt", (
                f"{name}: install without constraints.txt: {cmds[i]}"
            )
            assert "--index-url" not in argv, cmds[i]
        model_installs = [a for _, a in installs if "--no-deps" in a]
        assert len(model_installs) == 1 and requirements(model_installs[0]) == models, name

        # The last check asserts the torch build the node should have.
        check = next(c for c in reversed(cmds) if "import torch" in c)
        assert f"startswith('{pin}')" in check
        assert ("torch.cuda.is_available()" if kind == "gpu" else "torch.version.cuda is None") in check


def test_file_mounts_ship_the_repo_and_the_auth_token(raw):
    mounts = raw["file_mounts"]
    assert mounts["~/freeal-stream"] == "."
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "**/.git" in raw["rsync_exclude"] and ".gitignore" in raw["rsync_filter"]
    # rsync_filter ".gitignore" becomes rsync --filter 'dir-merge,- .gitignore': what git ignores stays home.
    ignored = set((ROOT / ".gitignore").read_text().split())
    for local_only in (".venv", ".freeal"):  # the laptop's venv (wrong torch build) and job state
        assert {local_only, local_only + "/"} & ignored, f"{local_only} would be copied to the nodes"


def all_commands(prepared):
    cmds = list(prepared["head_setup_commands"]) + list(prepared["worker_setup_commands"])
    for name in node_types(prepared):
        cmds += setup_commands_of(prepared, name)
    cmds += prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]
    return list(dict.fromkeys(cmds))


def test_every_command_is_valid_bash(prepared):
    for cmd in all_commands(prepared):
        r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd}\n{r.stderr}"


def run_like_ray(cmd, home, **env):
    """Run a command the way Ray's SSH runner does: interactive login bash that sources ~/.bashrc."""
    full = f"source ~/.bashrc; export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && ({cmd})"
    return subprocess.run(
        ["bash", "--login", "-c", "-i", full],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **env},
    )


def test_env_file_sets_the_node_environment_once(raw, tmp_path):
    (tmp_path / ".bashrc").write_text("# stock bashrc\n")
    env_cmd = next(c for c in raw["setup_commands"] if ENV_FILE[2:] in c and "printf" in c)
    for _ in range(2):  # `ray up` runs setup again on every update
        r = run_like_ray(env_cmd, tmp_path)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / ".bashrc").read_text().count(f". {ENV_FILE}") == 1
    r = run_like_ray('echo "$RAY_AUTH_MODE|$OMP_WAIT_POLICY|$HF_HUB_OFFLINE|$PATH"', tmp_path)
    auth, omp, offline, path = r.stdout.strip().split("|")
    assert (auth, omp, offline) == ("token", "PASSIVE", "1")
    assert path.split(":")[0] == f"{tmp_path}/freeal-stream/.venv/bin"


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "freeal-stream").exists(), reason="project venv not installed")
def test_cpu_check_command_accepts_this_cpu_install(raw, tmp_path):
    """The head's check step, run against this checkout's .venv (installed by scripts/install.sh)."""
    r = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-c", "import torch; print(torch.version.cuda)"],
        capture_output=True,
        text=True,
    )
    if r.stdout.strip() != "None":
        pytest.skip("this .venv has a CUDA torch")
    (tmp_path / ".bashrc").write_text("")
    (tmp_path / "freeal-stream").symlink_to(ROOT)
    check = next(c for c in raw["head_setup_commands"] if "import torch" in c)
    r = run_like_ray(check, tmp_path, RAY_AUTH_MODE="disabled")
    assert r.returncode == 0, r.stderr[-2000:]
