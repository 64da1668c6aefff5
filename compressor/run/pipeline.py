"""Running a plan: each step's output cached and materialised under the run directory, every
artifact measured, record.json and the reports written, the guard applied."""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from compressor import __version__
from compressor.models.artifact import Artifact, hash_dir, link_or_copy_tree
from compressor.models.formats import ONNX
from compressor.run.cache import Cache, make_key, write_json_atomic
from compressor.errors import CompressorError, GuardFailed, InputError, StepError, Terminated, termination_requested
from compressor.evaluate.base import EvalSettings
from compressor.host import Host
from compressor.recipe.plan import Plan, PlannedStep
from compressor.run.record import environment
from compressor.step import StepContext

RECORD_SCHEMA = 1


def eval_settings(plan: Plan) -> EvalSettings:
    """The recipe's `evaluate:` as EvalSettings."""
    ev = plan.recipe.evaluate
    lat = ev.latency
    return EvalSettings(threads=lat.threads if lat else 2, batch_sizes=tuple(lat.batch_sizes) if lat else (1,),
                        runs=lat.runs if lat else 0, warmup=lat.warmup if lat else 0, latency=lat is not None,
                        max_rows=ev.max_rows, task=dict(plan.eval_task), source=str(plan.source.path))


def _file_digests(task_settings: dict[str, Any]) -> dict[str, str]:
    """sha256 of the files the task's evaluator reads (e.g. a perplexity corpus): a changed file is re-measured."""
    import hashlib

    return {k: hashlib.sha256(Path(v).read_bytes()).hexdigest() for k, v in sorted(task_settings.items())
            if k.endswith("_file") and v and Path(v).is_file()}


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def external_inputs(value: Any, recipe_dir: Path) -> list[str]:
    """Content hashes of the files and directories a step's config names (a teacher, an adapter):
    part of the cache key, so that changing such an input reruns the step."""
    found: list[str] = []
    if isinstance(value, dict):
        for v in value.values():
            found += external_inputs(v, recipe_dir)
    elif isinstance(value, list):
        for v in value:
            found += external_inputs(v, recipe_dir)
    elif isinstance(value, str) and value and ("/" in value or "." in value):
        path = (recipe_dir / Path(value).expanduser()).resolve()
        if path.is_dir():
            found.append(hash_dir(path))
        elif path.is_file():
            from compressor.models.artifact import hash_file

            found.append(hash_file(path))
    return found


_CACHE_NAME = re.compile(r"^\.?(tmp-)?[0-9a-f]{16,64}(-\d+)?(\.json)?(\.tmp-\d+)?$|^(artifacts|metrics)$")


def disk_full(exc: BaseException | None) -> bool:
    """Whether an exception, or one it was raised from, says the disk is full: an OSError's errno, or the
    message of a library that wraps it (safetensors raises its own SafetensorError with the OS's text)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def failure_hint(exc: BaseException) -> str:
    """What to do about an unexpected exception from a step."""
    if disk_full(exc):
        return ("free disk space, or point COMPRESSOR_CACHE_DIR and --out at a larger disk, then run the same "
                "command again: finished steps are cached and the run resumes")
    if isinstance(exc, MemoryError):
        return "lower the step's batch_size or max_length, or run on a machine with more memory"
    return "run with --debug for the traceback"


def _tree_listing(run_dir: Path, cache_root: Path, recipe_dir: Path) -> set[str]:
    """What a step must not add to: every path under the run directory, and the entries right in
    the recipe's directory and the cache's directories (other than cache entries, which parallel
    runs may add). A cheap way to notice files a step made outside its output directory."""
    found = {str(p) for p in Path(run_dir).rglob("*")} if Path(run_dir).is_dir() else set()
    for folder, is_cache in ((recipe_dir, False), (cache_root, True), (Path(cache_root) / "artifacts", True),
                             (Path(cache_root) / "metrics", True)):
        if Path(folder).is_dir():
            found |= {str(p) for p in Path(folder).iterdir() if not (is_cache and _CACHE_NAME.match(p.name))}
    return found


def _prepare_run_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write to the run directory {path}: {exc.strerror}", where="--out",
                         hint="choose a writable directory with --out") from None


class Runner:
    """Runs one plan; `log` receives one line per event."""

    def __init__(self, plan: Plan, host: Host, run_dir: Path, cache: Cache, log: Callable[[str], None] = print):
        self.plan, self.host, self.cache, self.log = plan, host, cache, log
        self.run_dir = Path(run_dir).resolve()
        self.settings = eval_settings(plan)
        self.data_hash = plan.data.digest() if plan.data else None
        self._digests: dict[tuple[str, ...], str] = {}
        self._eval_rows: list[Any] | None = None
        self.environment = environment()
        #: threads for the steps' work (recipe `threads:`), apart from the measurement threads; a thread
        #: count can change a trained model's floats, so it keys the cache
        self.step_threads = plan.recipe.threads or available_cpus()

    # -- evaluation ---------------------------------------------------------------------------
    def eval_rows(self) -> list[Any]:
        """The evaluation rows (first max_rows), read once."""
        if self._eval_rows is None:
            split = self.plan.recipe.evaluate.split
            rows = self.plan.data.load(split) if self.plan.data and self.plan.data.has(split) else []
            self._eval_rows = rows[: self.settings.max_rows] if self.settings.max_rows else rows
        return self._eval_rows

    def measure(self, artifact: Artifact, artifact_hash: str, full: bool) -> dict[str, Any]:
        """Size and parameters always; the task metric and latency when `full` and possible (cached)."""
        from compressor.evaluate.measure import model_bytes, parameter_count

        m: dict[str, Any] = {"size_bytes": model_bytes(artifact), "parameters": parameter_count(artifact)}
        evaluator = self.host.evaluator_for(artifact.task, artifact.format)
        if not full:
            return m
        if evaluator is None:
            m["skipped"] = f"no evaluator for {artifact.task} on {artifact.format}"
            return m
        if self.host.task(artifact.task).needs_labels and (not artifact.labels or artifact.info.has_head is False):
            m["skipped"] = "the model has no task head yet"
            return m
        if not self.eval_rows():
            m["skipped"] = "no eval data"
            return m
        # a measurement belongs to the machine and runtime that made it: with a shared cache (Ray nodes),
        # one CPU's latency or one int8 kernel class's accuracy must not be reported for another
        env = self.environment
        split = self.plan.recipe.evaluate.split
        key = make_key(artifact_hash, self.settings.__dict__, split, self._data_digest((split,)), artifact.task,
                       artifact.labels,
                       f"{type(evaluator).__module__}.{type(evaluator).__qualname__}",
                       getattr(evaluator, "version", "1"), __version__, env["cpu"], env["int8_kernels"],
                       env["cpu_count"], env["libraries"], _file_digests(self.settings.task))
        cached = self.cache.get_metrics(key)
        if cached is None:
            self.log(f"  measuring {artifact.path.name} ({artifact.format}) on {len(self.eval_rows())} rows")
            t0 = time.perf_counter()
            try:
                cached = evaluator.evaluate(artifact, self.eval_rows(), self.settings)
            except CompressorError:
                raise
            except Exception as exc:
                raise StepError(f"measuring {artifact.path.name} failed: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:300]}", where=str(artifact.path),
                                hint=failure_hint(exc)) from exc
            cached["eval_seconds"] = time.perf_counter() - t0
            self.cache.put_metrics(key, cached)
        m.update(cached)
        m["metric"] = evaluator.metric
        # which way is better travels with the value: guards, sweeps and reports compare by it
        m["higher_is_better"] = self.host.task(artifact.task).metric_named(evaluator.metric).higher_is_better
        return m

    def _data_digest(self, splits: tuple[str, ...]) -> str | None:
        """The digest of the data splits a step reads (none: None), computed once per set of splits."""
        if not splits or self.plan.data is None:
            return None
        key = tuple(sorted(splits))
        if key not in self._digests:
            self._digests[key] = self.plan.data.digest(key)
        return self._digests[key]

    def step_versions(self, step: str) -> dict[str, str]:
        """What a step's output may depend on besides its inputs: compressor's version, the version of the
        distribution that provides the step, and of every library that shapes results (torch,
        transformers, onnxruntime, peft, torch-pruning, …). Part of its cache key, so that an
        upgrade reruns the step rather than handing back what the old version made."""
        provider = self.host.step_provider.get(step)
        plugin = next((p for p in self.host.plugins if p.name == provider), None)
        return {"compressor": __version__, "plugin": f"{plugin.distribution} {plugin.version}" if plugin else "",
                **self.environment["libraries"]}

    # -- steps --------------------------------------------------------------------------------
    def run_step(self, planned: PlannedStep, artifact: Artifact, input_hash: str,
                 history: list[tuple[str, Artifact]] | None = None,
                 key_basis: str | None = None) -> tuple[Artifact, dict[str, Any]]:
        """Run one step (or take it from the cache) and place its output under the run directory."""
        cls, config = planned.cls, planned.config
        key = self._step_key(planned, key_basis or input_hash)
        entry = self.cache.lookup(key)
        cached = entry is not None
        if entry is None:
            entry = self._execute(planned, artifact, input_hash, key, history)
        placed = self.run_dir / "artifacts" / f"{planned.index + 1:02d}-{planned.name}"
        if placed.exists():
            shutil.rmtree(placed)
        placed.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy_tree(self.cache.artifact_dir(key), placed)
        out = Artifact.load(placed)
        took = "from cache" if cached else f"{entry['seconds']:.1f}s"
        self.log(f"{'↺' if cached else '✓'} {planned.label}: {took}")
        return out, {"index": planned.index, "uses": planned.name, "version": cls.version,
                     "provider": self.host.step_provider.get(planned.name), "config": config.model_dump(mode="json"),
                     "input_hash": input_hash, "output_hash": entry["hash"], "seconds": entry["seconds"],
                     "cached": cached, "deterministic": cls.deterministic, "notes": entry.get("notes", {}),
                     "cache_key": key, "path": str(placed)}

    def _step_key(self, planned: PlannedStep, basis: str) -> str:
        """The cache key of a step: its input, name, version, config, data, seed, files read, versions, threads."""
        cls, config = planned.cls, planned.config
        return make_key(basis, cls.name, cls.version, config.model_dump(mode="json"), cls().cache_extra(config),
                        self._data_digest(cls().data_splits(config)), self.plan.recipe.seed,
                        external_inputs(config.model_dump(mode="json"), self.plan.recipe_dir),
                        self.step_versions(planned.name), self.step_threads)

    def _execute(self, planned: PlannedStep, artifact: Artifact, input_hash: str, key: str,
                 history: list[tuple[str, Artifact]] | None) -> dict[str, Any]:
        """Run the step into a temporary directory and commit it to the cache; returns its cache entry."""
        cls, config = planned.cls, planned.config
        self.host.pm.hook.step_started(index=planned.index, name=planned.name,
                                       config=config.model_dump(mode="json"), artifact=artifact)
        self.log(f"▶ {planned.label}")
        tmp = self.cache.temp_dir(key)
        ctx = StepContext(out_dir=tmp, data=self.plan.data, source=self.plan.source, seed=self.plan.recipe.seed,
                          threads=self.step_threads, recipe_dir=self.plan.recipe_dir,
                          history=list(history or []), recipe=self.plan.recipe, log=self.log)
        t0 = time.perf_counter()
        before = self._listing()
        try:
            out = cls().run(artifact, config, ctx)
        except CompressorError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(exc, StepError):
                exc = StepError(exc.message, where=exc.where, hint=exc.hint)
            exc.where = f"{planned.label}" + (f": {exc.where}" if exc.where and exc.where != planned.label else "")
            raise exc from None
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            # a stop signal that a library swallowed is told from a real failure in `run`, for the whole run
            raise StepError(f"{type(exc).__name__}: {exc}", where=planned.label, hint=failure_hint(exc)) from exc
        seconds = time.perf_counter() - t0
        try:  # until the cache holds it, the step's output is only a temporary directory: never left behind
            self._check_output(planned, out, tmp)
            self._check_writes(planned, artifact, input_hash, before)
            out.path = tmp
            out.save_meta()
            entry = {"hash": hash_dir(tmp), "seconds": seconds, "notes": ctx.notes, "key": key,
                     "created": datetime.now(timezone.utc).isoformat()}
            self.cache.commit(key, tmp, entry)
        except BaseException:  # a failed check, or SIGTERM / Ctrl-C between the step's end and the commit
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.cache.lookup(key) or entry  # a parallel run may have committed the same key first

    def _blame(self, planned: PlannedStep) -> str:
        """Where a broken step contract points: the step and the plugin that provides it."""
        return f"{planned.label}, from plugin {self.host.step_provider.get(planned.name)!r}"

    def _listing(self) -> set[str]:
        return _tree_listing(self.run_dir, self.cache.root, self.plan.recipe_dir)

    def _check_writes(self, planned: PlannedStep, artifact: Artifact, input_hash: str, before: set[str]) -> None:
        """A step writes only into its output directory: its input and the run directory stay as they were."""
        where = self._blame(planned)
        if hash_dir(artifact.path) != input_hash:
            raise StepError(f"the step changed its input model in {artifact.path}", where=where,
                            hint="a step must only read its input and write into ctx.out_dir")
        added = sorted(self._listing() - before)
        if added:
            raise StepError(f"the step wrote outside its output directory: {added[0]}"
                            + (f" and {len(added) - 1} more" if len(added) > 1 else ""), where=where,
                            hint="a step must write only into ctx.out_dir")

    def _check_output(self, planned: PlannedStep, out: Any, tmp: Path) -> None:
        """A step must return an artifact of its declared format, written inside its directory."""
        where = self._blame(planned)
        if not isinstance(out, Artifact):
            raise StepError(f"returned {type(out).__name__}, not an Artifact", where=where)
        if out.format != planned.cls.produces:
            raise StepError(f"declared format {planned.cls.produces!r} but returned {out.format!r}",
                            where=where, hint="the step's `produces` must match what run() returns")
        if Path(out.path).resolve() != tmp.resolve():
            raise StepError(f"returned an artifact at {out.path}, outside its output directory",
                            where=where, hint="write into ctx.out_dir and return an artifact there")
        if not any(tmp.iterdir()):
            raise StepError("wrote nothing into its output directory", where=where)

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run every step, measure, write record.json and the reports; returns the record."""
        _prepare_run_dir(self.run_dir)
        t0 = time.perf_counter()
        record = self._start_record()
        try:
            final = self._run_steps(record)
            from compressor.run.guard import check_guard

            record["guard"] = check_guard(self.plan.recipe.guard, record["artifacts"], self.plan.guard_baseline,
                                          self.plan.guard_directions)
            record["status"] = "ok" if record["guard"]["passed"] else "guard_failed"
            if self.plan.recipe.bundle.formats:
                try:
                    record["bundles"] = self.write_bundles(final, record)
                except CompressorError:
                    raise
                except Exception as exc:
                    raise StepError(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", where="bundle",
                                    hint=failure_hint(exc)) from exc
        except BaseException as exc:
            self._stopped(record, exc, t0)
            raise
        self._finish(record, t0)
        if not record["guard"]["passed"]:
            raise GuardFailed("; ".join(record["guard"]["failures"]), where="guard",
                              hint=f"artifacts and the report are in {self.run_dir}")
        return record

    def _start_record(self) -> dict[str, Any]:
        """The record of a run that begins: the recipe, environment, plugins and the measured input."""
        plan, source = self.plan, self.plan.source
        started = datetime.now(timezone.utc)
        source_hash = hash_dir(source.path)
        full = plan.evaluates(0) or plan.measures_first_for_baseline
        artifacts = [{"index": 0, "name": "input", "format": source.format, "path": str(source.path),
                      "hash": source_hash, **self.measure(source, source_hash, full=full)}]
        record: dict[str, Any] = {
            "schema": RECORD_SCHEMA, "compressor": __version__, "name": plan.recipe.name,
            "recipe_path": str(plan.recipe_path), "recipe": plan.recipe.model_dump(mode="json", by_alias=True),
            "recipe_hash": plan.recipe.digest(), "seed": plan.recipe.seed, "data_hash": self.data_hash,
            "started": started.isoformat(), "environment": self.environment,
            "evaluation": self.settings.__dict__, "step_threads": self.step_threads,
            "plugins": [p.__dict__ for p in self.host.plugins], "steps": [], "artifacts": artifacts,
            "status": "running",
        }
        if plan.variant:
            record["variant"], record["matrix"] = plan.variant, plan.matrix_values
        return record

    def _run_steps(self, record: dict[str, Any]) -> Artifact:
        """Run and measure each step in turn, appending to the record; returns the last artifact."""
        plan, artifacts = self.plan, record["artifacts"]
        current, current_hash = plan.source, artifacts[0]["hash"]
        # the recipe's task and labels shape what the first step makes (a new head), so they key it too
        first_key = make_key(current_hash, current.task, current.labels, current.info.has_head)
        history: list[tuple[str, Artifact]] = [("input", current)]
        for i, planned in enumerate(plan.steps):
            current, step_record = self.run_step(planned, current, current_hash, history,
                                                 key_basis=first_key if i == 0 else None)
            history.append((planned.name, current))
            current_hash = step_record["output_hash"]
            record["steps"].append(step_record)
            last = i == len(plan.steps) - 1
            baseline_missing = plan.measures_first_for_baseline and not any(a.get("metric") for a in artifacts)
            artifacts.append({"index": i + 1, "name": planned.name, "format": current.format,
                              "path": step_record["path"], "hash": current_hash,
                              **self.measure(current, current_hash,
                                             full=plan.evaluates(i + 1) or last or baseline_missing)})
            self.host.pm.hook.step_finished(index=planned.index, name=planned.name, artifact=current,
                                            record=step_record)
        return current

    def _stopped(self, record: dict[str, Any], exc: BaseException, t0: float) -> None:
        """Record why a run stopped early; a stop signal is raised as Terminated (the caller re-raises the rest)."""
        stop = termination_requested()
        if isinstance(exc, KeyboardInterrupt) or stop:  # a library may have swallowed the signal's exception
            self.cache.remove_own_temps()
            record["status"] = "interrupted"
            record["error"] = "interrupted (SIGINT or SIGTERM); run the same command again to resume"
            self._finish(record, t0)
            if not isinstance(exc, KeyboardInterrupt):
                raise Terminated(stop) from exc
        elif isinstance(exc, CompressorError):
            record["status"] = "failed"
            record["error"] = exc.render()
            self._finish(record, t0)

    def write_bundles(self, final: Artifact, record: dict[str, Any]) -> list[dict[str, Any]]:
        """One bundle per format in the recipe, golden inputs from the eval rows."""
        from compressor.bundle.writer import write_bundle

        golden = [r.text for r in self.eval_rows()[:4]] or None
        written = []
        for fmt in self.plan.recipe.bundle.formats:
            artifact = final if fmt == final.format else self._bundle_copy(final, fmt)
            target = self.run_dir / ("bundle" if fmt == ONNX else f"bundle-{fmt}")
            written.append(write_bundle(artifact, target, record, golden, tar=self.plan.recipe.bundle.tar))
            self.log(f"✓ bundle ({fmt}): {target}")
        return written

    def _bundle_copy(self, artifact: Artifact, fmt: str) -> Artifact:
        """The final ONNX artifact converted to the bundle format `fmt` by that format's from_onnx (cached like
        a step)."""
        from compressor.models.formats import format_named

        key = make_key(hash_dir(artifact.path), f"bundle-{fmt}", 1)
        if self.cache.lookup(key) is None:
            tmp = self.cache.temp_dir(key)
            format_named(fmt).from_onnx(artifact, tmp).save_meta()
            self.cache.commit(key, tmp, {"hash": hash_dir(tmp)})
        return Artifact.load(self.cache.artifact_dir(key))

    def _finish(self, record: dict[str, Any], t0: float) -> None:
        from compressor.report.files import write_reports

        record["finished"] = datetime.now(timezone.utc).isoformat()
        record["seconds"] = time.perf_counter() - t0
        write_json_atomic(self.run_dir / "record.json", record)
        write_reports(record, self.run_dir)
        self.host.pm.hook.run_finished(run_dir=str(self.run_dir), record=record)


def run_plan(plan: Plan, host: Host, run_dir: Path, use_cache: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a checked plan into `run_dir`; raises GuardFailed (exit 1) or StepError (exit 4)."""
    return Runner(plan, host, run_dir, Cache(enabled=use_cache), log).run()


