"""SearchConfig: one YAML file says what to search, how, for how long, and where results go.

Strict like the Recipe: an unknown or misspelt key anywhere is an error naming its dotted path.
See ``configs/`` for complete examples.

Every number is checked when the file is read, so that a bad value is one line naming its field
instead of a traceback minutes into the run: NaN and infinities are refused everywhere, counts and
seeds are bounded by what numpy and torch accept, and search ranges lie in their parameter's domain
(see mergetune.search.space).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from mergetune.errors import MergetuneError, TaskError, read_config_file
from mergetune.merging.methods import get_method
from mergetune.merging.residency import parse_bytes
from mergetune.objectives.normalization import Normalization, normalization_of
from mergetune.objectives.slices import check_fractions
from mergetune.objectives.tasks import TaskConfig, accepted_keys_line
from mergetune.objectives.zoo.specs import VIEW_FOLDER, get_zoo
from mergetune.recipe import SEED_LIMIT, Expert, resolve_model_path
from mergetune.search.optimizers import optimizer_class
from mergetune.search.space import DENSITY_DOMAIN, FloatRange, MethodSpace, OptionSpec, ParamRange, check_domain
from mergetune.strict import StrictModel, format_validation_error

ObjectiveName = Literal["mean", "worst", "sparsity"]
MAX_THREADS = 1024  # torch.set_num_threads overflows on huge values; no machine has more cores per worker
MAX_BATCH = 2**31 - 1  # sizes handed to torch must fit its int32 arguments


class _Section(StrictModel):
    """A section of the search config: strict, and NaN or infinite numbers are errors (they pass ``ge``/``le``)."""

    model_config = ConfigDict(allow_inf_nan=False)


class SearchConfigError(MergetuneError):
    """A search configuration does not validate."""


class ModelsConfig(_Section):
    """Either a zoo (experts built offline by ``mergetune zoo build``) or a base and its experts."""

    zoo: str | None = None
    base: str | None = None
    experts: list[Expert] = Field(default_factory=list)
    trust_remote_code: bool = False
    allow_tokenizer_mismatch: bool = Field(
        False, description="Search experts whose tokenizer differs from the base's (warn instead of refusing)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelsConfig:
        if (self.zoo is None) == (self.base is None):
            raise ValueError("give either 'zoo' or 'base' with 'experts'")
        if self.base is not None and not self.experts:
            raise ValueError("'experts' is empty: name at least one fine-tuned model")
        return self


class SpaceConfig(_Section):
    """Which methods, and how finely weights and densities vary (see mergetune.search.space)."""

    methods: dict[str, MethodSpace] = Field(min_length=1)
    weight: ParamRange = Field(
        ParamRange(),
        description="How weights vary (per). Its low/high, when given, apply to every method without its own "
        "'weight' range, replacing the method's built-in range (its paper's grid, used when low/high are not given).",
    )
    density: ParamRange = Field(
        ParamRange(per="shared"),
        description="How densities vary (per). Its low/high, when given, apply to every method without its own "
        "'density' range; without them each method searches its built-in range, else 0.05 to 1.",
    )
    granularity: int = Field(1, ge=1, description="Transformer blocks per layer group.")

    @field_validator("methods", mode="before")
    @classmethod
    def _list_of_names(cls, value: Any) -> Any:
        if isinstance(value, list):  # `methods: [ties, pcb]` is short for default settings
            return {name: {} for name in value}
        return value

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: dict[str, MethodSpace]) -> dict[str, MethodSpace]:
        for name, spec in value.items():
            options = get_method(name).Options.model_fields
            unknown = sorted(set(spec.options) - set(options))
            if unknown:
                raise ValueError(f"{name}: unknown option(s) {unknown}; {name} has {sorted(options)}")
            for option, option_spec in spec.options.items():
                _check_option_values(name, option, option_spec)
            if spec.density is not None:
                check_domain(spec.density, DENSITY_DOMAIN, f"{name}.density")
        return value

    @field_validator("density")
    @classmethod
    def _density_domain(cls, value: ParamRange) -> ParamRange:
        check_domain(value, DENSITY_DOMAIN, "density")
        return value


def _check_option_values(method: str, option: str, spec: OptionSpec) -> None:
    """Every value an option can take (a fixed one, each choice, both bounds) must pass the method's own checks."""
    if isinstance(spec, FloatRange):
        values: list[Any] = [spec.low, spec.high]
    else:
        values = spec if isinstance(spec, list) else [spec]
    for value in values:
        try:
            get_method(method).Options.model_validate({option: value})
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise ValueError(f"{method}.options.{option}: {value!r} is out of its domain ({reason})") from None


class OptimizerConfig(_Section):
    name: str = Field("tpe", description="A registered optimizer (mergetune.search.optimizers.OPTIMIZERS).")
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Candidates in flight before any result is told back; default: the executor's worker count.",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to the sampler / optimizer.")

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        optimizer_class(value)  # the registry is the one list of names: its error lists the available ones
        return value


class BudgetConfig(_Section):
    candidates: int | None = Field(100, ge=1)
    seconds: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetConfig:
        if self.candidates is None and self.seconds is None:
            raise ValueError("set 'candidates' or 'seconds' (or both)")
        return self


class ObjectivesConfig(_Section):
    """What the optimizer maximises. Every per-task score is recorded whatever is optimised.

    Multi-objective optimizers (tpe, nsga2, gp, random, grid) get the listed objectives as they
    are; single-objective ones (cmaes, ngopt, ng_cma, ng_de) get the scalarisation
    ``mean + worst_weight · worst − sparsity_weight · density − penalty · Σ_t max(0, floor_t − s_t)``.
    """

    optimize: list[ObjectiveName] = Field(default_factory=lambda: ["mean", "worst"], min_length=1)
    floors: float | dict[str, float] | None = Field(
        None,
        description="Per-task floor on the normalised score (a constraint); '*' is the default. It reads in the "
        "task's normalisation: 0.8 on a loss task normalised against its expert = keeps 80% of the expert's gain over "
        "the base; on a guard task = 80% of the base's score (accuracy) or perplexity at most 1/0.8 of the base's.",
    )
    worst_weight: float = Field(0.5, ge=0.0)
    sparsity_weight: float = Field(0.1, ge=0.0)
    penalty: float = Field(10.0, ge=0.0)

    @field_validator("optimize")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"objectives repeat: {value}")
        return value


class SelectionConfig(_Section):
    """How the final recipe is chosen: see mergetune.search.pareto."""

    rule: Literal["best_mean_feasible", "best_worst_feasible"] = "best_mean_feasible"
    rescore_top: int = Field(5, ge=1, description="Finalists re-scored on held-out validation examples.")
    holdout_fraction: float = Field(
        0.33, ge=0.0, lt=1.0, description="Share of each validation split kept away from the search for re-scoring."
    )


class FidelityConfig(_Section):
    """Multi-fidelity evaluation: candidates scored on growing slices, hopeless ones stopped (search.fidelity)."""

    enabled: bool = False
    slices: list[float] = Field(
        [0.125, 0.25, 0.5, 1.0], description="Cumulative fractions of each task's search examples per stage."
    )
    p_threshold: float = Field(
        0.05, gt=0, lt=1, description="Stop a candidate when a paired one-sided Wilcoxon test gives p below this."
    )

    @field_validator("slices")
    @classmethod
    def _slices(cls, value: list[float]) -> list[float]:
        try:
            return list(check_fractions(value))
        except TaskError as exc:
            raise ValueError(str(exc)) from exc


class EvaluationConfig(_Section):
    fidelity: FidelityConfig = FidelityConfig()
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    threads: int = Field(1, ge=1, le=MAX_THREADS, description="torch threads per worker.")
    autocast: Literal["none", "bfloat16"] = Field(
        "none",
        description="Score under bf16 autocast: 4.8x faster than float32 on text8 with bf16-capable CPUs (AMX), "
        "0 of 2,400 predictions changed (benchmarks/results/eval_speed.md); merges stay float32.",
    )
    device: str = "cpu"


class ResourcesConfig(_Section):
    """How the store of task vectors is kept: its dtype and the memory it may take (see mergetune.merging.residency).

    The store is chosen into a tier: on the merge device when it fits ``device_memory`` (on a CPU: ``memory``),
    else in host memory when it fits ``memory`` (streamed to the device chunk by chunk), else memory-mapped from a
    file written once under ``disk_dir`` (default: the run folder's ``cache/store``). With ``devices`` the layer
    groups are split over several devices (``mergetune.merging.placement``) and ``device_memory`` is per device.
    """

    storage_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype of the stored task vectors and base; bfloat16/float16 halve the store; the merge "
        "computes in float32 and recipes record this so `mergetune merge` reproduces them.",
    )
    memory: int | str | None = Field(None, description="Host memory the store may take: bytes or e.g. '24GB'.")
    device_memory: int | str | None = Field(
        None,
        description="Memory of the merge device (an accelerator) the store may take: bytes or e.g. '80GB'; "
        "with devices, per device.",
    )
    tier: Literal["device", "host", "disk"] | None = Field(None, description="Force a tier (default: by the budgets).")
    disk_dir: str | None = Field(None, description="Folder of a disk-tier store file (local disk; default: run cache).")
    devices: list[str] | Literal["auto"] | None = Field(
        None,
        description="Several devices in one worker: layer groups split over these (e.g. [cuda:0, cuda:1]; 'auto': "
        "every visible accelerator); each group merged and evaluated where it lives; device_memory is per device. "
        "Default: one device (evaluation.device). Checked on CPU only ([cpu, cpu]).",
    )
    device_map: Literal["auto", "balanced"] | dict[str, str | int] = Field(
        "auto",
        description="With devices: 'auto'/'balanced' (contiguous groups, the largest part as small as possible) or "
        "{layer group or module prefix: device name or position in devices} (accelerate's convention).",
    )

    @model_validator(mode="after")
    def _map_needs_devices(self) -> ResourcesConfig:
        if self.devices is None and isinstance(self.device_map, dict):
            raise ValueError("resources.device_map applies with resources.devices; list the devices it maps to")
        if isinstance(self.devices, list) and not self.devices:
            raise ValueError("resources.devices: the list is empty; omit it for one device")
        return self

    @field_validator("memory", "device_memory")
    @classmethod
    def _size(cls, value: int | str | None, info: Any) -> int | None:
        if value is None:
            return None
        try:
            return parse_bytes(value, f"resources.{info.field_name}")
        except MergetuneError as exc:
            raise ValueError(str(exc)) from None

    @property
    def memory_bytes(self) -> int | None:
        """``memory`` in bytes (the validator has read a size string)."""
        return None if self.memory is None else int(self.memory)

    @property
    def device_memory_bytes(self) -> int | None:
        return None if self.device_memory is None else int(self.device_memory)


class ExecutionConfig(_Section):
    """Where candidates run: in-process (``local``) or on Ray actors (``ray``), see mergetune.search.ray_executor."""

    executor: Literal["local", "ray"] = "local"
    address: str | None = Field(
        None, description="Ray: None starts a local runtime; 'auto', 'HOST:PORT' or 'ray://HOST:PORT' joins a cluster."
    )
    workers: int | None = Field(None, ge=1, description="Ray workers; default: one per GPU, else one per CPU.")
    gpus_per_worker: float | None = Field(None, gt=0, description="Ray: GPU share per worker (default 1 on cuda).")
    max_attempts: int = Field(3, ge=1, description="Tries of a candidate whose worker died, in all.")

    @model_validator(mode="after")
    def _ray_only(self) -> ExecutionConfig:
        if self.executor == "local":
            given = [k for k in ("address", "workers", "gpus_per_worker") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{given} apply to the ray executor only; set executor: ray")
        return self


class SearchConfig(_Section):
    name: str = Field(min_length=1)
    models: ModelsConfig
    tasks: list[TaskConfig] | None = Field(
        None,
        description="Required unless the models come from a zoo; with a zoo, tasks scored besides the zoo's own "
        "(a guard task, another kind on an expert's data): a source naming one of the zoo's views reads that view.",
    )
    space: SpaceConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    budget: BudgetConfig = BudgetConfig()
    objectives: ObjectivesConfig = ObjectivesConfig()
    selection: SelectionConfig = SelectionConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    execution: ExecutionConfig = ExecutionConfig()
    resources: ResourcesConfig = ResourcesConfig()
    warm_start: bool = Field(True, description="Evaluate known-good recipes first (TA λ=0.3, TIES defaults).")
    storage: str | None = Field(None, description="Optuna storage URL or journal path; default: OUTPUT/search.journal")
    output: str | None = Field(None, description="Output folder; default: runs/<name>")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Seeds the optimizer, holdout split and merges; < 2**32.")

    @field_validator("tasks")
    @classmethod
    def _task_seeds(cls, tasks: list[TaskConfig] | None) -> list[TaskConfig] | None:
        for task in tasks or ():
            if task.seed >= SEED_LIMIT:  # numpy's split generator refuses it, after the models are loaded
                raise ValueError(f"task '{task.name}': seed {task.seed} must be below 2**32")
        return tasks

    @model_validator(mode="after")
    def _devices_match(self) -> SearchConfig:
        """resources.devices are of evaluation.device's kind; a Ray worker gets as many GPUs as it spreads over."""
        devices, kind = self.resources.devices, self.evaluation.device.split(":")[0]
        if devices is None:
            return self
        if devices == "auto" and kind == "cpu":
            raise ValueError("resources.devices: auto takes every accelerator; set evaluation.device (e.g. cuda) too")
        other = [d for d in (devices if isinstance(devices, list) else []) if d.split(":")[0] != kind]
        if other:
            raise ValueError(f"resources.devices {other} are not of the kind of evaluation.device {kind}")
        gpus = self.execution.gpus_per_worker
        if self.execution.executor == "ray" and kind == "cuda":
            if devices == "auto" and gpus is None:
                raise ValueError("resources.devices: auto under Ray needs execution.gpus_per_worker (GPUs per worker)")
            if isinstance(devices, list) and gpus is not None and gpus < len(devices):
                raise ValueError(
                    f"execution.gpus_per_worker {gpus:g} is fewer than the {len(devices)} resources.devices of a worker"
                )
        return self

    @model_validator(mode="after")
    def _tasks_given(self) -> SearchConfig:
        if self.models.zoo is None:
            if not self.tasks:
                raise ValueError("'tasks' is required when models are given as base + experts")
            try:
                experts = assign_experts(self.tasks, [e.name for e in self.models.experts])
                check_floors(self.objectives.floors, self.tasks, experts)
            except TaskError as exc:
                raise ValueError(str(exc)) from None
        return self

    def resolved_tasks(self, expert_names: list[str], tasks: list[TaskConfig] | None = None) -> list[dict[str, Any]]:
        """Every task (the zoo's ``tasks``, then the config's) as a dict with its expert filled in (None: a guard).

        Ordered by expert (the experts' order, then the guard tasks), each group in the config's order:
        with one task per expert this is the order searches always had, so their results stay identical.
        """
        tasks = [*(tasks or []), *(self.tasks or [])]
        experts = assign_experts(tasks, expert_names)
        check_floors(self.objectives.floors, tasks, experts)  # a zoo's tasks are known only now
        rank = {name: i for i, name in enumerate(expert_names)}
        ordered = sorted(tasks, key=lambda t: rank.get(experts[t.name] or "", len(rank)))  # stable: config order kept
        return [{**t.model_dump(mode="json"), "expert": experts[t.name]} for t in ordered]

    @property
    def output_dir(self) -> Path:
        return Path(self.output or f"runs/{self.name}")

    def updated(self, section: str, **values: Any) -> SearchConfig:
        """A copy with some fields of one section replaced (command-line overrides), validated again."""
        data = self.model_dump(mode="json", exclude_unset=True)
        data[section] = {**data.get(section, {}), **values}
        try:
            return type(self).model_validate(data)
        except ValidationError as exc:
            raise SearchConfigError(f"invalid override of '{section}':\n{format_validation_error(exc)}") from exc

    @classmethod
    def load(cls, path: str | Path) -> SearchConfig:
        """Read and validate a config file; relative model and data paths resolve against its folder."""
        data = read_config_file(path, "search config", SearchConfigError)
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            about_tasks = any(error["loc"][:1] == ("tasks",) for error in exc.errors())
            hint = f"\n{accepted_keys_line()}" if about_tasks else ""
            raise SearchConfigError(f"{path}: invalid search config:\n{format_validation_error(exc)}{hint}") from exc
        return config.with_paths_from(Path(path).parent)

    def with_paths_from(self, folder: Path) -> SearchConfig:
        """A copy whose relative input paths (base, experts, task data) are absolute against ``folder``.

        Output and storage stay relative to the working directory: they say where results go.
        """
        experts = [e.model_copy(update={"model": resolve_model_path(e.model, folder)}) for e in self.models.experts]
        models_update: dict[str, Any] = {"experts": experts}
        if self.models.base is not None:
            models_update["base"] = resolve_model_path(self.models.base, folder)
        update: dict[str, Any] = {"models": self.models.model_copy(update=models_update)}
        if self.tasks is not None:
            views = _zoo_views(self.models.zoo)
            update["tasks"] = [
                t.model_copy(update={"source": views[t.source]}) if t.source in views else t.with_paths_from(folder)
                for t in self.tasks
            ]
        return self.model_copy(update=update)


def assign_experts(tasks: list[TaskConfig], expert_names: list[str]) -> dict[str, str | None]:
    """Each task's expert: its ``expert:``, else the expert of its name, else None (a guard task).

    Every task is scored; an expert may have several tasks; each expert needs at least one (else
    nothing would say how merging it helps). Each task's normalisation must be defined for it
    (``normalization_of``). Errors (TaskError) name the task or expert and list the choices.
    """
    names = set(expert_names)
    repeated = sorted({t.name for t in tasks if [u.name for u in tasks].count(t.name) > 1})
    if repeated:
        raise TaskError(f"task names must be unique; repeated: {repeated}")
    experts: dict[str, str | None] = {}
    for task in tasks:
        if task.expert is not None and task.expert not in names:
            raise TaskError(f"task '{task.name}': expert '{task.expert}' is not one of the experts {expert_names}")
        experts[task.name] = task.expert or (task.name if task.name in names else None)
        _normalization(task, experts)  # raises when the task's normalisation is undefined for it
    if tasks and all(t.normalize == "none" for t in tasks):
        raise TaskError("every task is normalised as 'none': nothing is left to optimise; normalise at least one")
    unused = [e for e in expert_names if e not in experts.values()]
    if unused:
        raise TaskError(
            f"no task for expert(s) {unused}: give each expert a task of its name, or a task with 'expert: NAME' "
            f"(the tasks are {[t.name for t in tasks]})"
        )
    return experts


def _zoo_views(zoo: str | None) -> dict[str, str]:
    """A zoo's view files (``trec6.jsonl``: questions written into the zoo) -> their paths in the zoo's cache.

    A task of a zoo search names a view as the zoo's own tasks do; it is then read in the zoo's cache
    folder, wherever the config lies (``./trec6.jsonl`` names a file beside the config instead).
    """
    if zoo is None:
        return {}
    spec = get_zoo(zoo)
    folder = spec.folder()
    return {file: str((folder / VIEW_FOLDER / file).resolve()) for file in spec.views}


Floors = float | dict[str, float] | None


def check_floors(floors: Floors, tasks: list[TaskConfig], experts: dict[str, str | None]) -> None:
    """Each task a floor names must be a task of the search that enters the objectives (normalisation not 'none').

    A floor on another name, or on a task scored in its own units only, would constrain nothing: a
    typo would silently leave a task unguarded. ``'*'`` (the default floor) may always be given.
    """
    if not isinstance(floors, dict):
        return
    normalized = [t.name for t in tasks if _normalization(t, experts).rule != "none"]
    for name in floors:
        if name == "*" or name in normalized:
            continue
        why = "is normalised as 'none' (own units, outside the objectives)" if name in experts else "is not a task"
        raise TaskError(
            f"objectives.floors: '{name}' {why}; floors apply to the normalised tasks {normalized} or '*' (all of them)"
        )


def _normalization(task: TaskConfig, experts: dict[str, str | None]) -> Normalization:
    return normalization_of(task.name, task.score_metric, task.normalize, has_expert=experts[task.name] is not None)
