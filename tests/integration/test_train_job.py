"""jobs/train.py on real Ray: two simulated nodes with S3, kill-and-resume, and ``ray job submit``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import ray.train.torch  # noqa: F401 (a required extra: a missing one fails, never skips)

from adcore import scorer as scorer_lib
from adcore import storage
from adcore.data import bmad
from adcore.data.demo import make_demo_dataset
from adcore.training import TrainConfig
from adcore.training.skipped import BadImageShareError
from jobs import train as train_job
from tests.faults_proxy import FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# Measured: cuts the wait of each ray.train.report from up to 2 s to about 0.2 s.
FAST_REPORTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_USAGE_STATS_ENABLED": "0"}
RUN_TIMEOUT_S = 240  # one job run (generous: CI machines are shared too)
# Enough epochs that the first run is still going when its first checkpoint lands.
RESUME_EPOCHS = 24
PROGRESS = re.compile(r"\[train\] fusion epoch (\d+)/(\d+)")
RESUMED = re.compile(r"resuming from checkpoint: stage (\w+), epoch (\d+)")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("bmad"), n_train=8, n_valid=4, n_test=2, size=64, seed=0)


@pytest.fixture
def ray_tmp():
    """A short RAY_TMPDIR (unix socket paths are limited to 107 bytes); removed processes first."""
    path = tempfile.mkdtemp(prefix="rtrain", dir="/tmp")
    yield path
    _kill_processes_using(path)
    shutil.rmtree(path, ignore_errors=True)


def _kill_processes_using(marker: str) -> None:
    """SIGKILL the processes whose command line names ``marker`` (our own Ray temp dir)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(ray_tmp: str, cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        **FAST_REPORTS,
        "RAY_TMPDIR": ray_tmp,
        "ADCORE_CACHE_DIR": str(cache),
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _score_one(artifact: str, data: Path) -> dict:
    """Load the artifact, score a test image; returns the artifact's training summary."""
    scorer = scorer_lib.load(artifact)
    image, _ = bmad.load_sample(bmad.list_split(data, "test")[0])
    [result] = scorer.score_images([image])
    assert np.isfinite(result.score) and result.anomaly_map.shape == image.shape[:2]
    return scorer.artifact_config["training"]


def test_two_nodes_s3(dataset, s3_server, ray_tmp, tmp_path, monkeypatch):
    """Two workers on two simulated nodes: data, checkpoints and artifact on S3."""
    import ray
    from ray.cluster_utils import Cluster

    bucket = s3_server.make_bucket("train-job-two-nodes")
    storage.upload_dir(dataset, f"{bucket}/data")
    for key, value in {**FAST_REPORTS, "RAY_TMPDIR": ray_tmp, "ADCORE_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)  # before the nodes start, so their workers inherit it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        job = train_job.JobConfig(
            data=f"{bucket}/data",
            output=f"{bucket}/model",
            storage=f"{bucket}/ray",
            num_workers=2,
            ray_address=cluster.address,
        )
        cfg = TrainConfig(preset="fusion-small", tiny=True, smoke_test=True, epochs=2, batch_size=4)
        result = train_job.main(job, cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert result.error is None
    assert result.metrics["epoch"] == 2 and "val_image_auroc" in result.metrics
    states = [f for f in storage.list_files(f"{bucket}/ray/{job.name()}") if f.endswith(train_job.STATE_FILE)]
    assert states, "no checkpoint reached S3 storage"
    summary = _score_one(f"{bucket}/model", dataset)
    assert summary["train_images"] == 8  # two shards of 4 (the smoke test keeps 8 images)
    assert [row["epoch"] for row in summary["history"] if row["stage"] == "fusion"] == [0, 1, 2]  # 0: before stage 2


def test_unreadable_image_on_s3_is_skipped_then_refused_above_the_share(s3_server, ray_tmp, tmp_path, monkeypatch):
    """A truncated training image on S3: the streamed run skips it and names it in the training
    summary; with a share below one image in eight, the run stops with one line that says why."""
    import ray

    data = make_demo_dataset(tmp_path / "demo", n_train=8, n_valid=4, n_test=2, size=64, seed=0)
    bad = sorted((data / "train" / "good").rglob("*.png"))[5]
    bad.write_bytes(bad.read_bytes()[:200])
    bucket = s3_server.make_bucket("train-job-bad-file")
    storage.upload_dir(data, f"{bucket}/data")
    for key, value in {**FAST_REPORTS, "RAY_TMPDIR": ray_tmp, "ADCORE_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    job = train_job.JobConfig(data=f"{bucket}/data", output=str(tmp_path / "model"), max_failures=0)
    cfg = TrainConfig(preset="patchcore", tiny=True, smoke_test=True, batch_size=4, max_bad_share=0.2)
    try:
        train_job.main(job, cfg)
        strict = TrainConfig(preset="patchcore", tiny=True, smoke_test=True, batch_size=4, max_bad_share=0.1)
        other = train_job.JobConfig(data=job.data, output=str(tmp_path / "refused"), max_failures=0)
        with pytest.raises(BadImageShareError) as refused:
            train_job.main(other, strict)
    finally:
        ray.shutdown()
    skipped = _score_one(job.output, data)["skipped_images"]["train"]
    assert skipped["count"] == 1 and list(skipped["files"]) == [bad.relative_to(data).as_posix()]
    message = str(refused.value)
    assert "\n" not in message and message.startswith("1 of 8 train images cannot be read or decoded"), message
    assert not (tmp_path / "refused").exists()


def _losses(summary: dict) -> list[tuple]:
    return [(r["stage"], r["epoch"], r["loss"]) for r in summary["history"] if r["loss"] is not None]


def test_images_are_read_once_per_run_with_the_same_losses(dataset, s3_server, ray_tmp, tmp_path, monkeypatch):
    """From S3, a run GETs each training image once (its first pass writes the frame cache, every later
    epoch and the fit read it); a resumed run GETs none; a run with --no-frame-cache GETs them each
    pass, and its losses are the cached run's."""
    import ray

    bucket = s3_server.make_bucket("train-job-frame-cache")
    storage.upload_dir(dataset, f"{bucket}/data")
    cfg = TrainConfig(preset="fusion-small", tiny=True, smoke_test=True, epochs=2, batch_size=4)
    job = train_job.JobConfig(data=f"{bucket}/data", output=str(tmp_path / "model"), storage=f"{bucket}/ray")
    plain = dataclasses.replace(job, output=str(tmp_path / "plain"), frame_cache=False)
    with FaultProxy(s3_server.endpoint) as proxy:
        env = {**FAST_REPORTS, "RAY_TMPDIR": ray_tmp, "ADCORE_CACHE_DIR": str(tmp_path / "cache")}
        for key, value in {**env, "AWS_ENDPOINT_URL": proxy.endpoint}.items():
            monkeypatch.setenv(key, value)  # before Ray starts, so its workers inherit it
        gets = []
        try:
            for run in (job, plain, job):  # the second run of ``job`` resumes from its last checkpoint
                train_job.main(run, cfg)
                gets.append(proxy.gets("/data/train/") - sum(gets))
        finally:
            ray.shutdown()
    cached, uncached = _score_one(job.output, dataset), _score_one(plain.output, dataset)
    images = cached["train_images"]
    assert gets[0] == images, f"each training image read once over every pass: {gets}"
    assert gets[1] >= 3 * images, f"without the cache each pass reads them again: {gets}"
    assert gets[2] == 0, f"the resumed run reads the cache: {gets}"
    assert len(_losses(cached)) >= 2 and _losses(cached) == _losses(uncached)
    assert storage.list_files(f"{bucket}/ray/{train_job.FRAME_CACHE_FOLDER}", suffixes=[".npy"])


def test_decode_tasks_ask_for_a_cpu_when_the_cluster_can_grow(ray_tmp, monkeypatch):
    """Decode tasks ask for --decode-cpus whenever the cluster can give it: now, or through its
    autoscaler (whose node groups Ray keeps in the GCS; published here as an autoscaler does, since
    no node provider runs on this machine); 0 only when a fixed cluster's CPUs are all taken."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_put

    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    job = train_job.JobConfig(data="unused", output="unused", num_workers=2)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        assert train_job._decode_cpus(dataclasses.replace(job, num_workers=1)) == 1.0
        assert train_job._decode_cpus(job) == 0.0, "a fixed cluster whose CPUs the workers hold: shared cores"
        config = autoscaler_pb2.ClusterConfig()
        group = config.node_group_configs.add(name="cpu", max_count=4)
        group.resources["CPU"] = 4
        _internal_kv_put(
            ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(),
            config.SerializeToString(),
            namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode(),
        )
        assert train_job._decode_cpus(job) == 1.0, "an autoscaler can add CPU nodes: the tasks ask for them"
    finally:
        ray.shutdown()


def _job_cmd(dataset: Path, out: Path, store: Path, epochs: int) -> list[str]:
    return [
        sys.executable,
        "jobs/train.py",
        "--data",
        str(dataset),
        "--output",
        str(out),
        "--storage",
        str(store),
        "--preset",
        "fusion-small",
        "--tiny",
        "--smoke-test",
        "--epochs",
        str(epochs),
        "--batch-size",
        "4",
    ]


def test_kill_and_resume(dataset, ray_tmp, tmp_path):
    """Kill the job (the whole process group) after its first checkpoint; a rerun resumes from it."""
    out, store = tmp_path / "model", tmp_path / "ckpt"
    env = _env(ray_tmp, tmp_path / "cache")
    cmd = _job_cmd(dataset, out, store, RESUME_EPOCHS)
    log1 = tmp_path / "first.log"
    with open(log1, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    snapshot = None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(store.glob("*/checkpoint_manager_snapshot.json"))
            if found and "checkpoint_" in found[0].read_text(errors="replace"):
                snapshot = found[0]
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _kill_processes_using(ray_tmp)
    assert snapshot is not None, f"no checkpoint before the first run ended:\n{log1.read_text()[-3000:]}"
    assert not out.exists(), "the first run finished before it was killed: raise RESUME_EPOCHS"

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    text = second.stdout + second.stderr
    assert second.returncode == 0, text[-3000:]
    resumed = RESUMED.search(text)
    assert resumed and int(resumed.group(2)) >= 1, text[-3000:]
    epochs = [int(m.group(1)) for m in PROGRESS.finditer(text)]
    first_fusion = int(resumed.group(2)) + 1 if resumed.group(1) == "fusion" else 1
    assert epochs and min(epochs) == first_fusion and max(epochs) == RESUME_EPOCHS
    history = _score_one(str(out), dataset)["history"]
    fusion = [row["epoch"] for row in history if row["stage"] == "fusion"]
    assert fusion == list(range(0, RESUME_EPOCHS + 1))  # resumed history kept


def _train_workers(ray_tmp: str) -> list[int]:
    """PIDs of the Ray Train workers of our own cluster (its RAY_TMPDIR is in their environment)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"RayTrainWorker" in cmdline and f"RAY_TMPDIR={ray_tmp}".encode() in environ:
            pids.append(int(proc.name))
    return pids


KILL_EPOCHS = 8  # fusion epochs of the worker-kill run
KILL_AFTER = 3  # the worker is killed once this fusion epoch has been reported


@pytest.mark.timeout(700)
def test_killed_worker_resumes_with_the_same_losses(dataset, ray_tmp, tmp_path):
    """SIGKILL the training worker mid-run: Ray Train restarts it (--max-failures), it resumes from the
    latest checkpoint (at an epoch's end or inside one), and the per-epoch losses are those of the same
    job run without a failure (no second warm-up; the streamed input gives the resumed epochs the
    batches they would have had)."""
    env = _env(ray_tmp, tmp_path / "cache")
    # A checkpoint after every step too: the restart may resume inside an epoch, at the same batch.
    extra = ["--max-failures", "1", "--warmup-share", "0.5", "--checkpoint-every-min", "0"]
    ref_out = tmp_path / "reference"
    reference = subprocess.run(
        _job_cmd(dataset, ref_out, tmp_path / "ref-ckpt", KILL_EPOCHS) + extra,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-3000:]
    _kill_processes_using(ray_tmp)

    out, store = tmp_path / "model", tmp_path / "ckpt"
    cmd = _job_cmd(dataset, out, store, KILL_EPOCHS) + extra
    log = tmp_path / "job.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    killed = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while time.monotonic() < deadline and proc.poll() is None and not killed:
            if f"fusion epoch {KILL_AFTER}/" in log.read_text(errors="replace"):
                for pid in _train_workers(ray_tmp):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)
        assert killed, f"no worker to kill:\n{log.read_text()[-3000:]}"
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    resumed = RESUMED.search(text)
    # The controller registers a reported checkpoint on its next poll: the latest one may be an epoch older.
    assert resumed and resumed.group(1) == "fusion" and 1 <= int(resumed.group(2)) <= KILL_AFTER, text[-3000:]
    history = _score_one(str(out), dataset)["history"]
    expected = _score_one(str(ref_out), dataset)["history"]
    got = [(r["stage"], r["epoch"]) for r in history if r["loss"] is not None]
    assert got == [(r["stage"], r["epoch"]) for r in expected if r["loss"] is not None]
    assert [r["loss"] for r in history if r["loss"] is not None] == pytest.approx(
        [r["loss"] for r in expected if r["loss"] is not None], rel=1e-4
    ), "losses after the restart differ from an uninterrupted run's"


def test_ray_job_submit_patchcore(dataset, ray_tmp, tmp_path):
    """``ray job submit --working-dir .`` against a local head; PatchCore through the same job."""
    env = _env(ray_tmp, tmp_path / "cache")
    dash = _free_port()
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--port",
            str(_free_port()),
            "--dashboard-port",
            str(dash),
            "--dashboard-host",
            "127.0.0.1",
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
            "--temp-dir",
            ray_tmp,
            "--ray-client-server-port",
            str(_free_port()),
            "--dashboard-agent-listen-port",
            str(_free_port()),
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        started = head.communicate(timeout=RUN_TIMEOUT_S)[0]
        assert head.returncode == 0, started[-3000:]
        out = tmp_path / "model"
        # gitignore syntax: a bare "data" would also drop adcore/data.
        excludes = json.dumps({"excludes": ["/.venv", "/.git", "__pycache__", "*.pt", "*.onnx", "*.safetensors"]})
        submit = subprocess.run(
            [
                str(VENV_BIN / "ray"),
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dash}",
                "--working-dir",
                ".",
                "--runtime-env-json",
                excludes,
                "--",
                "python",
                "jobs/train.py",
                "--data",
                str(dataset),
                "--output",
                str(out),
                "--storage",
                str(tmp_path / "ckpt"),
                "--preset",
                "patchcore",
                "--tiny",
                "--smoke-test",
                "--num-workers",
                "2",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        text = submit.stdout + submit.stderr
        assert submit.returncode == 0 and "succeeded" in text, text[-3000:]
    finally:
        if head.poll() is None:
            head.kill()
        try:
            os.killpg(head.pid, signal.SIGKILL)  # the head's daemons stay in this process group
        except ProcessLookupError:
            pass
        _kill_processes_using(ray_tmp)
    _score_one(str(out), dataset)
