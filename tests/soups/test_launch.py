"""`soups.launch`: submitit runs (real local subprocesses), failures listed and resubmitted, SLURM script fields."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from soups.launch import Run, slurm_script, submit_runs
from soups.utils import SoupsError

LOCAL = {"cluster": "local", "array_parallelism": 2, "timeout_min": 5}


def _copy_run(tmp_path: Path, name: str) -> Run:
    """A run that copies src/<name> to runs/<name>: it fails (in its job) while src/<name> is missing."""
    return Run(name=name, fn=shutil.copytree, args=(str(tmp_path / "src" / name), str(tmp_path / "runs" / name)),
               output=tmp_path / "runs" / name)


def test_failed_runs_are_listed_and_only_they_resubmitted(tmp_path: Path) -> None:
    for name in ("a", "c"):
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / "x.txt").write_text(name)
    runs = [_copy_run(tmp_path, n) for n in ("a", "b", "c")]
    with pytest.raises(SoupsError, match=r"1 of 3 runs failed \(the other 2 finished\)") as err:
        submit_runs(runs, LOCAL)
    message = str(err.value)
    assert "\n  b (" in message and "No such file" in message and "b.submitit" in message  # the run and its log
    assert "\n  a (" not in message and "\n  c (" not in message
    assert [r.is_done() for r in runs] == [True, False, True]
    assert len(list((tmp_path / "runs" / "a.submitit").glob("*_0_log.err"))) == 1  # logs beside the output

    (tmp_path / "src" / "b").mkdir()
    (tmp_path / "src" / "b" / "x.txt").write_text("b")
    assert submit_runs(runs, LOCAL) == {"done": 2, "ran": 1}  # only b
    assert (tmp_path / "runs" / "b" / "x.txt").read_text() == "b"
    assert len(list((tmp_path / "runs" / "a.submitit").glob("*_0_log.err"))) == 1  # a was not submitted again
    assert submit_runs(runs, LOCAL) == {"done": 3, "ran": 0}


def test_slurm_script_carries_the_settings_without_submitting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch/srun reachable: rendering must not need them
    cfg = {"cluster": "slurm", "partition": "gpu-a100", "gpus_per_node": 4, "timeout_min": 720, "cpus_per_task": 12,
           "mem_gb": 64, "array_parallelism": 16, "slurm_additional_parameters": {"account": "soups", "qos": "high"},
           "setup": ["module load cuda/12.4"]}
    script = slurm_script(cfg, tmp_path / "%j", name="experts")
    for line in ("#SBATCH --partition=gpu-a100", "#SBATCH --gpus-per-node=4", "#SBATCH --time=720",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --mem=65536MB", "#SBATCH --account=soups",
                 "#SBATCH --qos=high", "#SBATCH --job-name=experts", "module load cuda/12.4"):
        assert line in script.splitlines(), line
    assert not list(tmp_path.glob("*/*.sh"))  # nothing written to submit
    with pytest.raises(SoupsError, match="cluster=slurm but this machine has no SLURM"):
        submit_runs([_copy_run(tmp_path, "a")], cfg)


def test_bad_settings() -> None:
    with pytest.raises(SoupsError, match="submitit.cluster='ray'; valid: local, slurm"):
        submit_runs([Run("a", print, output=Path("/nonexistent/a"))], {"cluster": "ray"})
    with pytest.raises(SoupsError, match="unknown submitit option 'partiton'"):
        submit_runs([], {"partiton": "gpu"})


def test_a_preempted_job_is_requeued_with_its_resume_arguments(tmp_path: Path) -> None:
    """A real local job sent submitit's pre-emption signal: `Checkpointable` requeues it with `resume_args`."""
    import signal
    import subprocess
    import time

    import psutil

    from soups.launch import _Call, executor

    done = tmp_path / "resumed"
    ex = executor(LOCAL, tmp_path / "job")
    job = ex.submit(_Call(), subprocess.call, (["sleep", "60"],), (["mkdir", str(done)],))
    controller = psutil.Process(int(job.job_id))
    sleeper = None
    for _ in range(1200):  # until the first call runs (its `sleep` child exists: submitit's handlers are set)
        sleeper = next((c for c in controller.children(recursive=True) if c.name() == "sleep"), None)
        if sleeper is not None:
            break
        time.sleep(0.1)
    assert sleeper is not None
    sleeper.parent().send_signal(signal.SIGUSR2)  # to the task, as SLURM's --signal=USR2@90 before pre-emption
    assert job.result() == 0 and done.is_dir()  # the requeued call was mkdir, not a second sleep


@pytest.mark.parametrize("entry", ["vision_sweep", "quickstart"])
def test_config_nodes_declare_every_setting_with_the_defaults(entry: str) -> None:
    from omegaconf import OmegaConf

    from soups.launch import DEFAULTS

    config = OmegaConf.load(Path(__file__).parents[2] / "configs" / entry / "config.yaml")
    node = OmegaConf.to_container(config.submitit)
    assert node == DEFAULTS
