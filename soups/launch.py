"""`submit_runs`: many independent runs through `submitit` (SLURM on a cluster, local subprocesses elsewhere).

The multi-run drivers (`vision/sweep.py`, the expert and MORL stages of `soups.quickstart`) describe each run as
a `Run`: a picklable function and its arguments, the run's output directory, and the file whose presence says
the run finished (the drivers publish outputs atomically, so a present file means a complete run).
`submit_runs(runs, cfg)`:

- skips finished runs, so a driver re-run with the same command submits only what is missing (idempotent);
- submits the rest through `submitit.AutoExecutor` and waits: `cluster=slurm` as one job array per call
  (`array_parallelism` at once), `cluster=local` as subprocesses of this machine, at most `array_parallelism`
  at once, or one per id of `local_gpus` (each job sees only its GPU in `CUDA_VISIBLE_DEVICES`);
- puts each run's submitit folder (submission script, stdout/stderr logs, pickled call and result) beside its
  output: `<output>.submitit/` (on SLURM a link to the array task's folder);
- lets a pre-empted or timed-out job requeue itself: the call is a `submitit.helpers.Checkpointable`, so
  submitit resubmits the same call (up to `max_num_timeout` times) and the run resumes as its trainer does on
  a restart (`resume=true` for `rl/train_ppo.py`; the short vision runs start over);
- lists every failed run with its log and raises one `SoupsError` after all the others finished, so fixing the
  cause and running the same command again resubmits exactly the failed runs.

Nothing here calls `sbatch` unless `cluster=slurm`; `slurm_script` renders the sbatch file without submitting.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from soups.utils import SoupsError

__all__ = ["CLUSTERS", "DEFAULTS", "Run", "executor", "settings", "slurm_script", "submit_runs"]

CLUSTERS = ("local", "slurm")
#: Seconds between checks of running local jobs.
POLL_S = 0.5

#: The `submitit:` config node's fields and defaults (configs/vision_sweep/config.yaml documents them).
DEFAULTS: dict[str, Any] = {
    "cluster": "local",
    "array_parallelism": 2,
    "local_gpus": None,
    "timeout_min": 240,
    "partition": None,
    "gpus_per_node": 1,
    "cpus_per_task": 8,
    "mem_gb": 32,
    "max_num_timeout": 3,
    "slurm_additional_parameters": {},
    "setup": [],
}


@dataclass
class Run:
    """One independent run.

    Attributes:
        name: A short label for messages.
        fn: A picklable (module-level) function; it runs in the job's process as `fn(*args)`.
        args: Its arguments (picklable).
        output: The run's output directory; its submitit folder is `<output>.submitit`.
        done_file: The file whose presence means the run finished; default `output` itself.
        resume_args: The arguments of a requeued job (after pre-emption or timeout), e.g. the trainer's
            `resume=true`; default `args`.
    """

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    output: Path = Path(".")
    done_file: Path | None = None
    resume_args: tuple[Any, ...] | None = None

    def is_done(self) -> bool:
        """Whether the run's completed output is there."""
        return Path(self.done_file or self.output).exists()

    @property
    def log_dir(self) -> Path:
        """The run's submitit folder, beside its output."""
        out = Path(self.output)
        return out.parent / f"{out.name}.submitit"


class _Call(submitit.helpers.Checkpointable):
    """`fn(*args)` as a submitit job; on pre-emption or timeout submitit calls `checkpoint` and requeues the
    returned call: `fn(*resume_args)` when the run can continue from its own checkpoints, else the same call."""

    def __call__(self, fn: Callable[..., Any], args: tuple[Any, ...], resume_args: tuple[Any, ...] | None) -> Any:
        return fn(*args)

    def checkpoint(  # type: ignore[override]
        self, fn: Callable[..., Any], args: tuple[Any, ...], resume_args: tuple[Any, ...] | None
    ) -> submitit.helpers.DelayedSubmission:
        again = args if resume_args is None else resume_args
        return submitit.helpers.DelayedSubmission(self, fn, again, resume_args)


def settings(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """`cfg` over `DEFAULTS`, checked (drivers call it before their first run, so a typo costs nothing).

    Raises:
        SoupsError: an unknown field, cluster or a parallelism below 1.
    """
    settings = {**DEFAULTS, **dict(cfg or {})}
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise SoupsError(f"unknown submitit option {unknown[0]!r}; valid: {', '.join(DEFAULTS)}")
    if settings["cluster"] not in CLUSTERS:
        raise SoupsError(f"submitit.cluster={settings['cluster']!r}; valid: {', '.join(CLUSTERS)}")
    if int(settings["array_parallelism"]) < 1:
        raise SoupsError(f"submitit.array_parallelism={settings['array_parallelism']} must be ≥ 1")
    return settings


def _slurm_parameters(s: Mapping[str, Any], name: str) -> dict[str, Any]:
    """`SlurmExecutor.update_parameters` arguments of the settings (what AutoExecutor translates the generic
    names into: time, mem, job_name)."""
    params: dict[str, Any] = {
        "job_name": name,
        "time": int(s["timeout_min"]),
        "gpus_per_node": int(s["gpus_per_node"]),
        "cpus_per_task": int(s["cpus_per_task"]),
        "mem": f"{int(round(float(s['mem_gb']) * 1024))}MB",
        "array_parallelism": int(s["array_parallelism"]),
        "additional_parameters": dict(s["slurm_additional_parameters"] or {}),
        "setup": list(s["setup"] or []),
    }
    if s["partition"]:
        params["partition"] = str(s["partition"])
    return params


class _OfflineSlurm(submitit.SlurmExecutor):
    """A SlurmExecutor that renders scripts where there is no SLURM (its constructor looks for `srun`)."""

    @classmethod
    def affinity(cls) -> int:
        return 1

    def _submit_command(self, command: str) -> Any:
        raise SoupsError("the offline SLURM executor only renders scripts")  # never sbatch from here


def executor(cfg: Mapping[str, Any] | None, folder: str | Path, name: str = "soups") -> submitit.Executor:
    """A configured submitit executor (nothing is submitted): `submitit.AutoExecutor(cluster="local")`, or the
    SLURM executor AutoExecutor picks on a cluster, given the SLURM settings directly.

    Args:
        cfg: The `submitit:` config node (see `DEFAULTS`).
        folder: The executor folder (may hold submitit's `%j`).
        name: The job name.

    Raises:
        SoupsError: bad settings, or `cluster=slurm` where SLURM's `srun` is missing.
    """
    s = settings(cfg)
    if s["cluster"] == "local":
        ex = submitit.AutoExecutor(folder=str(folder), cluster="local", local_max_num_timeout=int(s["max_num_timeout"]))
        ex.update_parameters(timeout_min=int(s["timeout_min"]), name=name)
        return ex
    try:
        slurm = submitit.SlurmExecutor(str(folder), max_num_timeout=int(s["max_num_timeout"]))
    except RuntimeError as err:
        raise SoupsError(f"submitit.cluster=slurm but this machine has no SLURM ({err}); use submitit.cluster=local "
                         "or run the command on a login node") from None
    slurm.update_parameters(**_slurm_parameters(s, name))
    return slurm


def slurm_script(cfg: Mapping[str, Any] | None, folder: str | Path, name: str = "soups") -> str:
    """The sbatch script `cluster=slurm` would submit, rendered without SLURM and without submitting."""
    s = settings({**dict(cfg or {}), "cluster": "slurm"})
    ex = _OfflineSlurm(str(folder), max_num_timeout=int(s["max_num_timeout"]))
    ex.update_parameters(**_slurm_parameters(s, name))
    return ex._make_submission_file_text("python -u -m submitit.core._submit <folder>", "<uid>")


def _cause(err: BaseException) -> str:
    """The job's own exception line out of submitit's `FailedJobError` (which wraps the job's traceback)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", line)]
    return (raised[-1] if raised else lines[0] if lines else type(err).__name__)[:300]


def _log_hint(job: Any) -> str:
    try:
        return str(job.paths.stderr)
    except Exception:  # noqa: BLE001 - a hint only: the job may have no paths
        return "its .submitit folder"


def submit_runs(runs: Sequence[Run], cfg: Mapping[str, Any] | None, desc: str = "runs") -> dict[str, int]:
    """Runs every unfinished run through submitit and waits for them; finished runs are skipped.

    Args:
        runs: The runs.
        cfg: The `submitit:` config node (see `DEFAULTS`).
        desc: A label for messages.

    Returns:
        {"done": already finished, "ran": newly finished}.

    Raises:
        SoupsError: bad settings, or some runs failed (each listed with its log); all the others still ran.
    """
    s = settings(cfg)
    todo = [r for r in runs if not r.is_done()]
    counts = {"done": len(runs) - len(todo), "ran": 0}
    if not todo:
        return counts
    failures: list[str] = []

    def collect(pairs: Sequence[tuple[Run, Any]]) -> None:
        for run, job in pairs:
            try:
                job.result()
            except Exception as err:  # noqa: BLE001 - every failure is listed, none stops the others
                first = _cause(err)
                failures.append(f"{run.name} ({run.output}): {first}; log {_log_hint(job)}")
                continue
            if run.is_done():
                counts["ran"] += 1
            else:
                failures.append(f"{run.name} ({run.output}): the job ended without its output; log {_log_hint(job)}")

    if s["cluster"] == "slurm":
        root = Path(todo[0].output).parent / ".submitit"
        ex = executor(s, root / "%j", name=desc)
        with ex.batch():  # one job array: array_parallelism tasks at once
            jobs = [ex.submit(_Call(), r.fn, tuple(r.args), r.resume_args) for r in todo]
        for run, job in zip(todo, jobs):
            _link(run.log_dir, Path(job.paths.folder))
        collect(list(zip(todo, jobs)))
    else:
        # submitit's local executor starts every submitted job at once: keep at most `width` running, and give
        # each a GPU of its own when there are GPUs; a finished job's slot goes to the next run at once.
        gpus = _local_gpus(s["local_gpus"])
        free: list[int | None] = list(gpus) if gpus else [None] * int(s["array_parallelism"])
        pending = list(todo)
        running: list[tuple[Run, Any, int | None]] = []
        while pending or running:
            while pending and free:
                gpu, run = free.pop(0), pending.pop(0)
                ex = executor(s, run.log_dir, name=run.name)
                if gpu is not None:
                    ex.update_parameters(gpus_per_node=1, visible_gpus=[gpu])
                running.append((run, ex.submit(_Call(), run.fn, tuple(run.args), run.resume_args), gpu))
            ended = [item for item in running if item[1].done()]
            if not ended:
                time.sleep(POLL_S)
            for item in ended:
                running.remove(item)
                free.append(item[2])
                collect([(item[0], item[1])])
    if failures:
        listed = "\n  ".join(failures)
        raise SoupsError(
            f"{len(failures)} of {len(todo)} {desc} failed (the other {len(todo) - len(failures)} finished); run the "
            f"same command again to resubmit only these:\n  {listed}"
        )
    return counts


def _local_gpus(setting: Sequence[int] | None) -> list[int]:
    """GPU ids for local jobs: the given ones; null = every visible CUDA device (none on a CPU machine).

    submitit's local executor sets `CUDA_VISIBLE_DEVICES` for every job (empty without GPUs), so the ids are
    physical ones: those of this process's own `CUDA_VISIBLE_DEVICES` when it is set.
    """
    if setting is not None:
        return [int(g) for g in setting]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        try:
            return [int(g) for g in visible.split(",") if g.strip()]
        except ValueError:
            raise SoupsError(f"CUDA_VISIBLE_DEVICES={visible!r} is not a list of GPU ids; set "
                             "submitit.local_gpus=[0,1,...]") from None
    import torch

    return list(range(torch.cuda.device_count()))


def _link(link: Path, target: Path) -> None:
    """`link` -> `target` (replacing an older link of a previous submission)."""
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        return  # a real folder from a local run: leave it
    os.symlink(target, link, target_is_directory=True)
