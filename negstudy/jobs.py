"""Jobs that survive faults: identity, resume, failure isolation and the sweep summary.

A job's **identity** is a hash of its resolved config without what does not change its results
(output paths, the logger, ``batch_size``, resume settings) plus negstudy's version. A job

- marks its directory ``.incomplete`` while it runs; the report ignores such directories, so a job
  killed at any moment contributes either its complete results or none;
- on success writes ``done.json`` (its hash and files) and registers itself in the job store
  (``job_store/<hash>.json`` -> its directory);
- on an exception writes ``failed.json`` (the one-line cause) and, inside a multirun, returns
  normally so that the other jobs go on;
- with ``resume=true`` (the default), is skipped when a finished job of the same hash exists: in
  its own directory (a rerun into the same sweep directory), or anywhere the store knows of, whose
  results are then linked into this job's directory so that the sweep's report is complete.

At the end of a multirun :func:`summarize` lists the jobs done, skipped and failed, writes
``summary.json`` / ``summary.md`` into the sweep directory and gives the command that reruns
only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from negstudy import __version__
from negstudy.records import write_text

log = logging.getLogger("negstudy")
INCOMPLETE, DONE, FAILED = ".incomplete", "done.json", "failed.json"
IGNORED_KEYS = ("logger", "resume", "job_store", "batch_size", "hydra")
NOT_RESULTS = {".hydra", "wandb", INCOMPLETE, DONE, FAILED, "negstudy.log"}


def job_hash(cfg: DictConfig) -> str:
    """sha256 (16 hex digits) of the resolved config without IGNORED_KEYS, and negstudy's version."""
    keys = [k for k in cfg.keys() if k not in IGNORED_KEYS]
    body = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)
    text = json.dumps({"config": body, "negstudy": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def store_dir(cfg: DictConfig) -> Path:
    """The job store, relative to the directory the command was launched from."""
    path = Path(os.path.expanduser(cfg.get("job_store") or "outputs/.jobs"))
    if not path.is_absolute():
        try:
            from hydra.core.hydra_config import HydraConfig

            path = Path(HydraConfig.get().runtime.cwd) / path
        except ValueError:  # not under Hydra
            path = Path.cwd() / path
    return path


def finished(job_dir: Path, digest: str) -> bool:
    """Whether ``job_dir`` holds the complete results of the job ``digest``."""
    try:
        done = json.loads((job_dir / DONE).read_text())
    except (OSError, ValueError):
        return False
    return (done.get("hash") == digest and not (job_dir / INCOMPLETE).exists()
            and all((job_dir / f).exists() for f in done.get("files", [])))


def _results(job_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(job_dir)) for p in job_dir.rglob("*")
                  if p.is_file() and not NOT_RESULTS & set(p.relative_to(job_dir).parts) and not p.name.startswith("."))


def _link_results(source: Path, target: Path) -> list[str]:
    """Hard-link (copy across file systems) the result files of ``source`` into ``target``."""
    files = _results(source)
    for name in files:
        dst = target / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            dst.unlink()
        try:
            os.link(source / name, dst)
        except OSError:
            shutil.copy2(source / name, dst)
    return files


@dataclass
class Outcome:
    status: str  # done | skipped | failed
    hash: str
    cause: str = ""


def run(cfg: DictConfig, out_dir: Path, body: Callable[[], None], *, multirun: bool) -> Outcome:
    """Run ``body`` as the job of ``cfg`` in ``out_dir`` with resume and failure isolation.

    ConfigError and KeyboardInterrupt propagate (user errors and user intent); any other exception
    is recorded in ``failed.json`` and re-raised outside a multirun."""
    from negstudy.errors import ConfigError

    out_dir = Path(out_dir)
    digest = job_hash(cfg)
    store = store_dir(cfg)
    if cfg.get("resume", True):
        if finished(out_dir, digest):
            _mark_reused(out_dir, out_dir, digest, json.loads((out_dir / DONE).read_text())["files"])
            print(f"negstudy: job {digest} already finished in {out_dir}: skipped")
            return Outcome("skipped", digest)
        try:
            previous = Path(json.loads((store / f"{digest}.json").read_text())["dir"])
        except (OSError, ValueError, KeyError):
            previous = None
        if previous is not None and previous.resolve() != out_dir.resolve() and finished(previous, digest):
            _mark_reused(out_dir, previous, digest, _link_results(previous, out_dir))
            print(f"negstudy: job {digest} already finished in {previous}: results linked into {out_dir}, skipped")
            return Outcome("skipped", digest)
    threads = size_threads()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INCOMPLETE).write_text(f"{digest}\n")
    for stale in (DONE, FAILED):
        (out_dir / stale).unlink(missing_ok=True)
    started = time.time()
    try:
        body()
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - isolate the failure, record it, let the sweep go on
        cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()
        write_text(json.dumps({"hash": digest, "cause": cause, "seconds": round(time.time() - started, 1),
                               "traceback": traceback.format_exc()}, indent=1), out_dir / FAILED)
        log.error("job %s failed: %s", digest, cause, exc_info=True)
        if not multirun:
            raise
        print(f"negstudy: job {digest} FAILED: {cause} (details in {out_dir / FAILED})")
        return Outcome("failed", digest, cause)
    _mark_done(out_dir, digest, _results(out_dir), seconds=round(time.time() - started, 1), cpu=cpu_name(),
               threads=threads)
    try:
        store.mkdir(parents=True, exist_ok=True)
        write_text(json.dumps({"dir": str(out_dir.resolve())}), store / f"{digest}.json")
    except OSError as err:  # the results are complete; only reuse by other sweeps is lost
        log.warning("could not register job %s in %s: %s", digest, store, err)
    return Outcome("done", digest)


def local_launcher_cpus() -> int | None:
    """``hydra.launcher.cpus_per_task`` inside a job of submitit's local executor, which starts every
    job of the sweep at once and, unlike SLURM, allocates no cores: the job holds itself to that many."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return None
    try:
        from hydra.core.hydra_config import HydraConfig

        cpus = HydraConfig.get().launcher.get("cpus_per_task")
    except (ValueError, AttributeError):  # no Hydra job, or a launcher without the field
        return None
    return int(cpus) if isinstance(cpus, int) and cpus > 0 else None


def cpu_name() -> str:
    """The CPU's model name (every time negstudy reports names the machine it was measured on)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def size_threads() -> int:
    """Torch threads from the job's CPU allocation: SLURM_CPUS_PER_TASK, else (submitit's local
    executor) the launcher's cpus_per_task, else the affinity mask (never more; a smaller
    OMP_NUM_THREADS wins). Without this every task of a node uses every core, and jobs that share
    cores slow each other several-fold."""
    import torch

    affinity = len(os.sched_getaffinity(0))
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        n, source = int(os.environ["SLURM_CPUS_PER_TASK"]), "SLURM_CPUS_PER_TASK"
    elif (local := local_launcher_cpus()) is not None:
        n, source = min(local, affinity), "hydra.launcher.cpus_per_task (submitit local)"
    else:
        n, source = affinity, "CPU affinity"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and 0 < int(os.environ["OMP_NUM_THREADS"]) < n:
        n, source = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    torch.set_num_threads(max(n, 1))
    log.info("torch threads: %d (from %s)", torch.get_num_threads(), source)
    return torch.get_num_threads()


def record_failure(cfg: DictConfig, out_dir: Path, cause: str) -> None:
    """failed.json for a job that stopped before it ran (e.g. a bad value in one cell of a grid)."""
    try:
        digest = job_hash(cfg)
    except Exception:  # noqa: BLE001 - a config that does not even resolve
        digest = None
    (Path(out_dir) / INCOMPLETE).unlink(missing_ok=True)
    write_text(json.dumps({"hash": digest, "cause": cause}, indent=1), Path(out_dir) / FAILED)


def _mark_done(out_dir: Path, digest: str, files: list[str], **extra) -> None:
    write_text(json.dumps({"hash": digest, "files": files, **extra}, indent=1), out_dir / DONE)
    (out_dir / INCOMPLETE).unlink(missing_ok=True)


def _mark_reused(out_dir: Path, source: Path, digest: str, files: list[str]) -> None:
    """``out_dir`` done with the results of ``source`` (itself or a finished job elsewhere): the time, CPU
    and threads that made them travel with them (a report's "jobs' time"), and where they came from."""
    made = {k: v for k, v in json.loads((source / DONE).read_text()).items() if k not in ("hash", "files", "reused_from")}
    _mark_done(out_dir, digest, files, **made, reused_from=str(source))


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Directories of the jobs of a sweep (those Hydra wrote a .hydra/ folder into)."""
    return sorted((p.parent for p in Path(sweep_dir).glob("**/.hydra") if "report" not in p.parts),
                  key=lambda p: (len(p.parts), p.name.zfill(8)))


def summarize(sweep_dir: Path, command: str) -> dict:
    """Status of every job of the sweep; writes summary.json and summary.md into the sweep directory."""
    sweep_dir = Path(sweep_dir)
    jobs = []
    for d in job_dirs(sweep_dir):
        name = str(d.relative_to(sweep_dir))
        overrides = _overrides(d)
        if (d / DONE).exists() and not (d / INCOMPLETE).exists():
            done = json.loads((d / DONE).read_text())
            jobs.append({"job": name, "status": "skipped" if "reused_from" in done else "done", "hash": done.get("hash"),
                         "overrides": overrides})
        elif (d / FAILED).exists():
            failed = json.loads((d / FAILED).read_text())
            jobs.append({"job": name, "status": "failed", "hash": failed.get("hash"), "cause": failed.get("cause", ""),
                         "overrides": overrides})
        else:
            jobs.append({"job": name, "status": "failed", "cause": "did not finish (killed?)", "overrides": overrides})
    counts = {s: sum(j["status"] == s for j in jobs) for s in ("done", "skipped", "failed")}
    summary = {"sweep_dir": str(sweep_dir), "command": command, "jobs": jobs, **counts,
               "rerun": command if counts["failed"] else None}
    write_text(json.dumps(summary, indent=1), sweep_dir / "summary.json")
    md = [f"# Sweep summary: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed", ""]
    md += [f"- job {j['job']} ({' '.join(j['overrides']) or 'no overrides'}): {j['status']}"
           + (f": {j['cause']}" if j.get("cause") else "") for j in jobs]
    if counts["failed"]:
        md += ["", "Rerun only the failed jobs (finished ones are skipped):", "", f"    {command}"]
    write_text("\n".join(md) + "\n", sweep_dir / "summary.md")
    return summary


def _overrides(job_dir: Path) -> list[str]:
    try:
        return list(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
    except Exception:  # noqa: BLE001 - a summary line without overrides is still useful
        return []
