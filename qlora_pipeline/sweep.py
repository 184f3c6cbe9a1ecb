"""`qlora sweep`: many ordinary runs of one config, points chosen by Optuna, ranked on validation.

Each point is the config with the swept settings replaced (and its `sweep` section emptied), written to
`sweep_NNN/trial_NNN/point.json` and run as its own process, `python -m qlora_pipeline run --config point.json
--output-dir sweep_NNN/trial_NNN`: an ordinary run directory whose config.json is the point's resolved config, so
`qlora reproduce` reruns it alone. Running points as processes keeps the orchestrator out of this module (only the
command line imports it) and gives `--jobs` its parallelism; a point that fails is recorded and the sweep goes on.

The search is an Optuna study stored in `sweep_NNN/study.db` (SQLite): grid points are enqueued in the order the
grid lists them (fixed parameters; Optuna's GridSampler would shuffle them and stops a study when its last point
finishes, before re-queued ones), random points come from its RandomSampler, bayesian ones from TPE, seeded.
`qlora sweep --resume sweep_NNN` reopens the study: finished points (succeeded or failed) stay, interrupted ones run
again, and the rest of the budget is spent. `sweep.jobs` threads each wait on one point's process; they take
their trials from the study one at a time (`_optimize`), not through Optuna's `n_jobs`, which on SQLite can hand
one queued point to two threads.

Points that share an encoder setting (model, embedding, data and seed) share cached vectors: with several jobs
the first point of each setting runs before the others of that setting start, so a sweep over heads encodes
once, and every later point reads its vectors without loading the model.

The leaderboard ranks by `sweep.metric` on the validation split; test metrics are shown beside, never used to
pick. `sweep.json`, `leaderboard.md` / `.csv`, `metric_vs_settings.png` and `qlora compare` of the best point
against the others (`compare_best_vs_rest.md`) are written in the sweep directory.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_pipeline.config import (
    LOWER_IS_BETTER,
    Config,
    ConfigError,
    field_hint,
    load_config,
    numeric_type,
    parse_value,
    save_config,
)
from qlora_pipeline.errors import UserError
from qlora_pipeline.runs import (
    allocate_numbered_dir,
    attach_file_log,
    detach_file_log,
    now_iso,
    read_json,
    write_json,
)

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

RECORD = "sweep.json"
STUDY = "study.db"
POINT = "point.json"
INTERRUPTED_CODES = (130, -2, -15, 143)  # SIGINT / SIGTERM: the point was stopped, not wrong


@dataclass(frozen=True)
class Outcome:
    """How one point's run ended."""

    state: str  # succeeded | failed | interrupted
    run_dir: Path | None
    error: str | None = None


Runner = Callable[[Config, Path], Outcome]


class PointFailed(Exception):
    """A point's run failed: recorded in the study, and the sweep goes on."""


class PointInterrupted(Exception):
    """A point's run was stopped by a signal: recorded, and run again when the sweep is resumed."""


@dataclass(frozen=True)
class SweepResult:
    sweep_dir: Path
    leaderboard: list[dict[str, Any]]
    best: dict[str, Any] | None
    markdown: str


def sweep_config(
    path: str | Path,
    overrides: list[str],
    grid: list[str],
    *,
    method: str | None = None,
    trials: int | None = None,
    metric: str | None = None,
    jobs: int | None = None,
) -> Config:
    """The config file with `--set` overrides, `--grid KEY=[V1,V2]` options (each replaces that field's list in
    sweep.grid) and the sweep options given on the command line, validated as one."""
    data = load_config(path, overrides).to_dict()
    spec = data["sweep"]
    for item in grid:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--grid '{item}' must look like section.field=[v1, v2], e.g. classifier.C=[0.1,1,10]")
        values = parse_value(text, f"--grid '{item}'")
        if not isinstance(values, list):
            raise ConfigError(f"--grid '{item}': give the values as a list, e.g. {key.strip()}=[{text}]")
        spec["grid"][key.strip()] = values
    for name, value in (("method", method), ("trials", trials), ("metric", metric), ("jobs", jobs)):
        if value is not None:
            spec[name] = value
    return Config.from_dict(data)


# ---- points -------------------------------------------------------------------------------------------------


def point_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with `params` (dotted field -> value) set and an empty sweep section: an ordinary run."""
    data = base.to_dict()
    data.pop("sweep")
    for dotted, value in params.items():
        *sections, name = dotted.split(".")
        node = data
        for section in sections:
            node = node[section]
        node[name] = value
    return Config.from_dict(data)


def grid_points(base: Config) -> list[dict[str, Any]]:
    """Every combination of the grid lists, the first key varying slowest."""
    grid = base.sweep.grid
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def check_sweep(base: Config) -> None:
    """Before anything is written: something to sweep, a validation split to rank on, and every value valid for
    its field (every grid point builds; for random and bayesian each value and range end on its own)."""
    spec = base.sweep
    if not spec.swept:
        raise UserError("the config has no sweep.grid or sweep.ranges, and no --grid was given: nothing to sweep")
    if "validation" not in base.evaluation.splits:
        raise UserError(
            "sweep.metric is read on the validation split; add validation to evaluation.splits "
            f"(it has {base.evaluation.splits})"
        )
    candidates: list[tuple[str, dict[str, Any]]] = []
    if spec.method == "grid":
        candidates = [(", ".join(f"{k}={v!r}" for k, v in p.items()), p) for p in grid_points(base)]
    else:
        candidates += [(f"sweep.grid.{k}: {v!r}", {k: v}) for k, values in spec.grid.items() for v in values]
        for key, bounds in spec.ranges.items():
            cast = numeric_type(field_hint(key)) or float
            candidates += [(f"sweep.ranges.{key}: {end:g}", {key: cast(end)}) for end in (bounds.low, bounds.high)]
    for where, params in candidates:
        try:
            point_config(base, params)
        except ConfigError as err:
            raise ConfigError(f"sweep point {where}: {err}") from err


def encoder_group(config: Config) -> str | None:
    """What decides a point's vectors (model, embedding, data, seed), or None when it has none to share."""
    if config.experiment.mode != "embeddings" or not config.embedding.cache:
        return None
    data = config.to_dict()
    return json.dumps([data["model"], data["embedding"], data["data"], data["experiment"]["seed"]], sort_keys=True)


def run_point(config: Config, trial_dir: Path) -> Outcome:
    """`python -m qlora_pipeline run` of one point into `trial_dir` (its console output in output.log)."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, trial_dir / POINT)
    package_root = str(Path(__file__).resolve().parent.parent)  # the points run this very package
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}
    command = [sys.executable, "-m", "qlora_pipeline", "run", "--config", str(trial_dir / POINT)]
    with (trial_dir / "output.log").open("w", encoding="utf-8") as output:
        done = subprocess.run(
            [*command, "--output-dir", str(trial_dir)],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    return read_outcome(trial_dir, done.returncode)


def read_outcome(trial_dir: Path, returncode: int) -> Outcome:
    """The point's run directory (the newest in `trial_dir`), its state, and why it failed when it did."""
    runs = sorted(trial_dir.glob("run_*"))
    run_dir = runs[-1] if runs else None
    state = (read_json(run_dir / "status.json", optional=True) or {}).get("state") if run_dir else None
    if returncode == 0 and state == "succeeded":
        return Outcome("succeeded", run_dir)
    log_file = trial_dir / "output.log"
    lines = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines() if log_file.is_file() else []
    errors = [line for line in lines if line.startswith("qlora: error")]
    error = errors[-1] if errors else (lines[-1] if lines else f"exit code {returncode}")
    stopped = state == "interrupted" or returncode in INTERRUPTED_CODES
    return Outcome("interrupted" if stopped else "failed", run_dir, error=error)


def metrics_of(run_dir: Path, metric: str) -> tuple[float | None, float | None]:
    """The primary head's overall `metric` on validation and test (None where a split was not scored or the
    metric is undefined, as ROC-AUC with one class)."""
    record = read_json(run_dir / "metrics.json")
    primary = record["primary_head"]
    values = []
    for split in ("validation", "test"):
        overall = record["splits"].get(split, {}).get(primary, {}).get("overall", {})
        value = overall.get(metric)
        values.append(None if value is None else float(value))
    return values[0], values[1]


# ---- the study ----------------------------------------------------------------------------------------------


class _Turn:
    """A point's place at its encoder setting's gate: `finished(True)` once its run succeeded."""

    def __init__(self) -> None:
        self.succeeded = False

    def finished(self, succeeded: bool) -> None:
        self.succeeded = succeeded


class _FirstOfEachEncoder:
    """With several jobs, the first point of each encoder setting runs before the other points of that setting
    start, so that they read its cached vectors instead of computing them again at the same time. A first point
    that fails (say, in its config checks, before encoding anything) hands the lead to the next one waiting."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._state: dict[str, str] = {}  # encoder setting -> "leading" (a point encodes) | "done" (one succeeded)

    @contextmanager
    def gate(self, group: str | None) -> Iterator[_Turn]:
        turn = _Turn()
        if group is None:
            yield turn
            return
        with self._changed:
            while self._state.get(group) == "leading":
                self._changed.wait()
            leads = group not in self._state
            if leads:
                self._state[group] = "leading"
        try:
            yield turn
        finally:
            if leads:
                with self._changed:
                    if turn.succeeded:
                        self._state[group] = "done"
                    else:
                        del self._state[group]  # the next point waiting leads in its place
                    self._changed.notify_all()


class _Objective:
    """One trial: the point's parameters from the study, its run, its validation metric (the trial's value)."""

    def __init__(self, sweep_dir: Path, base: Config, runner: Runner) -> None:
        self.sweep_dir, self.base, self.runner = sweep_dir, base, runner
        self.gates = _FirstOfEachEncoder()
        self.on_finish: Callable[[], object] = lambda: None

    def __call__(self, trial: optuna.Trial) -> float:
        spec = self.base.sweep
        params: dict[str, Any] = {}
        for key, values in spec.grid.items():
            params[key] = json.loads(trial.suggest_categorical(key, [json.dumps(v) for v in values]))
        for key, bounds in spec.ranges.items():
            if numeric_type(field_hint(key)) is int:
                params[key] = trial.suggest_int(key, int(bounds.low), int(bounds.high), log=bounds.log)
            else:
                params[key] = trial.suggest_float(key, bounds.low, bounds.high, log=bounds.log)
        name = f"trial_{trial.number:03d}"
        trial.set_user_attr("point", params)
        trial.set_user_attr("trial_dir", name)
        config = point_config(self.base, params)
        log.info("sweep %s: %s", name, settings_text(params))
        try:
            with self.gates.gate(encoder_group(config)) as turn:
                outcome = self.runner(config, self.sweep_dir / name)
                turn.finished(outcome.state == "succeeded")
        except KeyboardInterrupt:
            trial.set_user_attr("outcome", "interrupted")
            raise
        if outcome.run_dir is not None:
            trial.set_user_attr("run_dir", str(outcome.run_dir.relative_to(self.sweep_dir)))
        validation = test = None
        if outcome.state == "succeeded" and outcome.run_dir is not None:
            validation, test = metrics_of(outcome.run_dir, spec.metric)
            trial.set_user_attr("test", test)
        if outcome.state == "succeeded" and validation is None:
            outcome = Outcome("failed", outcome.run_dir, error=f"validation {spec.metric} is undefined for this run")
        trial.set_user_attr("outcome", outcome.state)
        if outcome.error:
            trial.set_user_attr("error", outcome.error)
        log.info("sweep %s: %s%s", name, outcome.state, f" ({outcome.error})" if outcome.error else "")
        self.on_finish()
        if outcome.state == "interrupted":
            raise PointInterrupted(outcome.error)
        if outcome.state == "failed":
            raise PointFailed(outcome.error)
        assert validation is not None
        trial.set_user_attr("validation", validation)
        return validation


def _sampler(spec: Any, seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    if spec.method == "bayesian":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # grid points are enqueued with every parameter fixed


def _open_study(sweep_dir: Path, base: Config) -> optuna.Study:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say what each trial did, and why
    spec = base.sweep
    seed = base.experiment.seed if spec.seed is None else spec.seed
    return optuna.create_study(
        study_name="sweep",
        storage=optuna.storages.RDBStorage(f"sqlite:///{sweep_dir / STUDY}"),
        sampler=_sampler(spec, seed),
        direction="minimize" if spec.metric in LOWER_IS_BETTER else "maximize",
        load_if_exists=True,
    )


def _outcome(trial: optuna.trial.FrozenTrial) -> str:
    import optuna

    if trial.state == optuna.trial.TrialState.COMPLETE:
        return "succeeded"
    if trial.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING):
        return "pending"
    return str(trial.user_attrs.get("outcome", "failed"))


def _queue_what_is_left(sweep_dir: Path, study: optuna.Study, base: Config) -> int:
    """Mark the trials a killed sweep left running as interrupted, queue the interrupted points again (once),
    and, for a grid, every point never tried; returns how many trials are left to run."""
    import optuna

    state = optuna.trial.TrialState
    storage = optuna.storages.RDBStorage(f"sqlite:///{sweep_dir / STUDY}")
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(state.RUNNING,)):  # nothing runs them any more
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, "outcome", "interrupted")
        storage.set_trial_state_values(trial_id, state.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        if _outcome(trial) == "interrupted" and trial.number not in retried:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    if base.sweep.method == "grid":
        for point in grid_points(base):
            study.enqueue_trial({key: json.dumps(value) for key, value in point.items()}, skip_if_exists=True)
    waiting = len(study.get_trials(deepcopy=False, states=(state.WAITING,)))
    if base.sweep.method == "grid":
        return waiting
    finished = [t for t in study.get_trials(deepcopy=False) if _outcome(t) in ("succeeded", "failed")]
    assert base.sweep.trials is not None
    return max(base.sweep.trials - len(finished), waiting)


def _optimize(study: optuna.Study, objective: _Objective, trials: int, jobs: int) -> None:
    """Run `trials` trials, `jobs` at a time, each taken from the study under one lock: optuna's own `n_jobs` loop
    can hand one queued point to two threads at once on SQLite, which has no row locks. A point that failed or was
    interrupted is told FAIL and the others go on; any other error (Ctrl-C included) is told FAIL, stops the taking
    of new points, and is raised once the points already running have ended. A SystemExit leaves its trial
    running, as a killed sweep would, for `resume` to retry."""
    import optuna

    taking = threading.Lock()
    left = trials
    stop = threading.Event()

    def take() -> optuna.Trial | None:
        nonlocal left
        with taking:
            if left == 0 or stop.is_set():
                return None
            left -= 1
            return study.ask()

    def work() -> None:
        while (trial := take()) is not None:
            try:
                value = objective(trial)
            except (PointFailed, PointInterrupted):
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            except (Exception, KeyboardInterrupt):
                stop.set()
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            except BaseException:
                stop.set()
                raise
            study.tell(trial, value)

    if jobs == 1:
        work()
        return
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="sweep") as pool:
        workers = [pool.submit(work) for _ in range(jobs)]
        try:
            for worker in workers:
                worker.result()
        except BaseException:
            stop.set()  # Ctrl-C lands here, in the main thread: the points running end (their processes got it too)
            raise


def start_sweep(base: Config, output_root: str | Path | None = None, *, runner: Runner = run_point) -> SweepResult:
    """A new `sweep_NNN` under the output root, its study run to the end."""
    check_sweep(base)
    root = Path(output_root if output_root is not None else base.output.root)
    sweep_dir = allocate_numbered_dir(root, "sweep", "choose another with --output-dir")
    write_json(
        sweep_dir / RECORD,
        {"sweep": sweep_dir.name, "created_at": now_iso(), "state": "running", "config": base.to_dict(), "points": []},
    )
    return run_sweep(sweep_dir, base, runner=runner)


def resume_sweep(sweep_dir: str | Path, jobs: int | None = None, *, runner: Runner = run_point) -> SweepResult:
    """Continue an interrupted sweep from its study: what finished stays, the rest runs."""
    folder = Path(sweep_dir)
    record = read_json(folder / RECORD, optional=True)
    if record is None or not (folder / STUDY).is_file():
        raise UserError(f"{folder} is not a sweep directory (no {RECORD} and {STUDY}); pass outputs/sweep_NNN")
    base = Config.from_dict(record["config"])
    if jobs is not None:
        base.sweep.jobs = jobs
    return run_sweep(folder, base, runner=runner)


def run_sweep(sweep_dir: Path, base: Config, *, runner: Runner = run_point) -> SweepResult:
    """Run the study's remaining trials (`sweep.jobs` at a time), then write the leaderboard, plot and comparison.
    On an interrupt the leaderboard of what finished is written, the sweep marked interrupted, and it re-raises."""
    handler = attach_file_log(sweep_dir / "sweep.log")
    try:
        study = _open_study(sweep_dir, base)
        remaining = _queue_what_is_left(sweep_dir, study, base)
        objective = _Objective(sweep_dir, base, runner)
        objective.on_finish = lambda: write_record(sweep_dir, base, study, "running")
        log.info("sweep %s: %d point(s) to run, %d at a time", sweep_dir.name, remaining, base.sweep.jobs)
        try:
            if remaining > 0:
                _optimize(study, objective, remaining, base.sweep.jobs)
        except BaseException:
            write_record(sweep_dir, base, study, "interrupted")
            raise
        return finish(sweep_dir, base, study)
    finally:
        detach_file_log(handler)


# ---- what a sweep writes ------------------------------------------------------------------------------------


def leaderboard(base: Config, study: optuna.Study) -> list[dict[str, Any]]:
    """One row per point tried (a retried point counts once, by its last try), best first by validation; the
    points that did not succeed after the others."""
    rows: dict[str, dict[str, Any]] = {}
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        outcome = _outcome(trial)
        if outcome == "pending":
            continue
        point = trial.user_attrs.get("point", {})
        rows[json.dumps(point, sort_keys=True)] = {
            "trial": trial.user_attrs.get("trial_dir", f"trial_{trial.number:03d}"),
            "run": trial.user_attrs.get("run_dir"),
            "point": point,
            "state": outcome,
            "validation": trial.user_attrs.get("validation"),
            "test": trial.user_attrs.get("test"),
            "error": trial.user_attrs.get("error"),
        }
    lower = base.sweep.metric in LOWER_IS_BETTER

    def rank(row: dict[str, Any]) -> tuple[int, float, str]:
        value = row["validation"]
        if row["state"] != "succeeded" or value is None:
            return (1, 0.0, row["trial"])
        return (0, value if lower else -value, row["trial"])

    return sorted(rows.values(), key=rank)


def write_record(sweep_dir: Path, base: Config, study: optuna.Study, state: str) -> tuple[list[dict[str, Any]], str]:
    """sweep.json (state, points) and the leaderboard as markdown and CSV: rewritten after every point. Returns the
    leaderboard's rows and its markdown."""
    rows = leaderboard(base, study)
    record = read_json(sweep_dir / RECORD, optional=True) or {"sweep": sweep_dir.name, "config": base.to_dict()}
    record.update(state=state, updated_at=now_iso(), metric=base.sweep.metric, points=rows)
    write_json(sweep_dir / RECORD, record)
    keys = base.sweep.swept
    with (sweep_dir / "leaderboard.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "rank",
                "trial",
                "run",
                *keys,
                f"validation_{base.sweep.metric}",
                f"test_{base.sweep.metric}",
                "state",
                "error",
            ]
        )
        for i, row in enumerate(rows, 1):
            values = [json.dumps(row["point"].get(k), ensure_ascii=False) for k in keys]
            writer.writerow(
                [i, row["trial"], row["run"], *values, row["validation"], row["test"], row["state"], row["error"]]
            )
    markdown = leaderboard_markdown(sweep_dir, base, rows, state)
    (sweep_dir / "leaderboard.md").write_text(markdown, encoding="utf-8")
    return rows, markdown


def leaderboard_markdown(sweep_dir: Path, base: Config, rows: list[dict[str, Any]], state: str) -> str:
    from qlora_pipeline.evaluation.metrics import format_metric
    from qlora_pipeline.reporting.markdown import table

    spec = base.sweep
    metric, keys = spec.metric, spec.swept
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    counts = {s: sum(r["state"] == s for r in rows) for s in ("succeeded", "failed", "interrupted")}
    lines = [
        f"# Sweep {sweep_dir.name}: {base.experiment.name}",
        "",
        f"{spec.method} search over {', '.join(f'`{k}`' for k in keys)}; ranked by validation {metric} of the "
        f"primary head ({better} is better). Test is shown, never used to pick. State: **{state}**; points: "
        + ", ".join(f"{n} {s}" for s, n in counts.items()),
        "",
    ]
    body = [
        [
            str(i) if row["state"] == "succeeded" else "–",
            f"{row['run'] or row['trial']}",
            *(json.dumps(row["point"].get(k), ensure_ascii=False) for k in keys),
            format_metric(row["validation"]),
            format_metric(row["test"]),
            row["state"],
        ]
        for i, row in enumerate(rows, 1)
    ]
    lines += table(["rank", "run", *keys, f"validation {metric}", f"test {metric}", "state"], body)
    best = rows[0] if rows and rows[0]["state"] == "succeeded" else None
    if best is not None:
        lines += [
            f"Best: `{best['run']}` ({settings_text(best['point'])}). Every point is an ordinary run: "
            f"`qlora reproduce {sweep_dir / best['run']}` reruns it alone.",
            "",
        ]
    failed = [row for row in rows if row["state"] != "succeeded"]
    if failed:
        lines += ["## Points that did not succeed", ""]
        lines += [f"- `{row['trial']}` ({row['state']}): {row['error']}" for row in failed]
        lines += [""]
    if (sweep_dir / "metric_vs_settings.png").is_file():
        lines += [f"![validation {metric} against each swept setting](metric_vs_settings.png)", ""]
    if (sweep_dir / "compare_best_vs_rest.md").is_file():
        lines += ["The best point against the others: [compare_best_vs_rest.md](compare_best_vs_rest.md)", ""]
    return "\n".join(lines)


def settings_text(point: dict[str, Any]) -> str:
    return ", ".join(f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in point.items())


def finish(sweep_dir: Path, base: Config, study: optuna.Study) -> SweepResult:
    rows, _ = write_record(sweep_dir, base, study, "finished")
    succeeded = [row for row in rows if row["state"] == "succeeded"]
    if succeeded:
        plot_sweep(base, succeeded, sweep_dir / "metric_vs_settings.png")
    with_runs = [sweep_dir / row["run"] for row in succeeded if row["run"]]
    if len(with_runs) >= 2:
        from qlora_pipeline.reporting.compare import compare

        try:
            compare(with_runs, sweep_dir / "compare_best_vs_rest.md")
        except UserError as exc:  # the points are different tasks (a swept data setting changed the labels)
            log.warning("sweep %s: no comparison of the points (%s)", sweep_dir.name, str(exc))
    rows, markdown = write_record(sweep_dir, base, study, "finished")  # now linking the plot and the comparison
    return SweepResult(sweep_dir, rows, succeeded[0] if succeeded else None, markdown)


def plot_sweep(base: Config, rows: list[dict[str, Any]], path: Path) -> Path:
    """Validation metric against each swept setting, one panel per setting; the best point in red. Numbers on a
    numeric axis (log where the range is, or the values span over 100x), anything else as categories."""
    from matplotlib.figure import Figure

    keys, metric = base.sweep.swept, base.sweep.metric
    figure = Figure(figsize=(max(6.0, 4.2 * len(keys)), 3.8), layout="constrained")
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    best = rows[0]
    for ax, key in zip(axes, keys, strict=True):
        values = [row["point"].get(key) for row in rows]
        scores = [row["validation"] for row in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
            positive = min(xs) > 0
            bounds = base.sweep.ranges.get(key)
            if (bounds is not None and bounds.log) or (positive and max(xs) / min(xs) > 100):
                ax.set_xscale("log")
        else:
            labels = list(dict.fromkeys(json.dumps(v, ensure_ascii=False) for v in values))
            xs = [float(labels.index(json.dumps(v, ensure_ascii=False))) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize="small")
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.scatter(xs, scores, color="tab:blue", zorder=2)
        ax.scatter([xs[rows.index(best)]], [best["validation"]], color="tab:red", zorder=3, label="best")
        ax.set(xlabel=key, ylabel=f"validation {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle(f"Sweep: validation {metric} against each swept setting", fontsize="medium")
    figure.savefig(path, dpi=100)
    return path
