"""Experiment configs: TOML files, validated strictly.

A config names the dataset, the grid (networks x methods x weights x seeds),
the training protocol and the regulariser settings::

    [experiment]
    name = "mnist-quick"        # results go to <out>/<name>/
    dataset = "mnist"           # mnist, fashion-mnist, digits
    description = "..."         # optional
    limit = 12000               # optional: use only the first N training images
    val_limit = 0               # optional: first N validation images (0: all)
    test_limit = 0              # optional: first N test images (0: all)
    pixel_scale = "1/255"       # optional: "1/255" (inputs in [0, 1]) or "1/255^2" (the reference code's bug)

    [grid]
    networks = ["mlp", "mlp-dropout", "mlp-deep"]
    methods = ["none", "t1", "t2", "l1", "l2", "min_corr", "decov"]
    weights = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1, 5, 10, 100]
    seeds = [0, 1, 2]

    [model]                     # optional
    init = "torch"              # "torch" (PyTorch's default) or "glorot" (Glorot uniform, zero bias)

    [training]                  # every key optional; defaults: the paper's
    lr = 0.01
    momentum = 0.9
    nesterov = true
    lr_decay = 0.95
    lr_decay_steps = 3520
    batch_size = 256
    max_epochs = 1200
    patience = 20

    [regulariser]               # every key optional
    backend = "torch"
    dissimilarity = "abs_correlation"
    alpha = 0.5
    sampler = { kind = "all" }  # or { kind = "importance", p = 0.01 } or { kind = "random", p = 0.1 }
    include_bias = false        # L1/L2 over the biases too (true) or the weights only (false)

    [regulariser.networks.cnn]  # per-network overrides of the [regulariser] keys
    sampler = { kind = "importance", p = 0.01 }

    [report]                    # optional; how `experiment report` treats the runs
    drop_unconverged = false    # drop a weight of a (network, method) where a run did not converge
    max_weight = { l1 = 5, l2 = 10 }  # drop weights above these before selecting (default: none)

A run "did not converge" when it diverged (its loss became NaN or inf) or
its validation accuracy stayed below twice chance (``2 / classes``). The
report names every dropped weight and the reason. The options of
``[experiment]``, ``[model]`` and ``[regulariser]`` are recorded in every
row of ``runs.csv``; ``[report]`` changes only the report.

**Dropout** is the paper's fifth baseline. It is a network, not a loss term:
the dropout baseline is the network ``mlp-dropout`` trained with method
``none``; the regularisers can be added on top of it like on any network.
A method named ``dropout`` is refused with that hint.

The methods ``none`` ignores the weight: it runs once per network and seed,
with weight 0, not once per weight. A random sampler is seeded with the run's seed.

Every problem is a ``ValueError`` naming the key, e.g. ``grid.methods:
unknown method 'foo'; choose from none, t1, ...``. Values are parsed with
``tomllib``; nothing is evaluated.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .. import data, models
from ..training import TrainConfig, WEIGHTED_METHODS

__all__ = [
    "DATASETS",
    "NETWORKS",
    "GRID_METHODS",
    "SAMPLER_KINDS",
    "RegulariserSettings",
    "ReportSettings",
    "RunSpec",
    "ExperimentConfig",
    "shipped_configs",
    "load_config",
    "parse_config",
]

DATASETS = ("mnist", "fashion-mnist", "digits")
NETWORKS = tuple(models.MODELS)
#: methods a grid may name (``dropout`` is the network ``mlp-dropout``, see the module docstring)
GRID_METHODS = ("none", "t1", "t2", "l1", "l2", "min_corr", "decov")
SAMPLER_KINDS = ("all", "importance", "random")

_SECTIONS = ("experiment", "grid", "model", "training", "regulariser", "report")
_EXPERIMENT_KEYS = ("name", "dataset", "description", "limit", "val_limit", "test_limit", "pixel_scale")
_GRID_KEYS = ("networks", "methods", "weights", "seeds")
_MODEL_KEYS = ("init",)
_REGULARISER_KEYS = ("backend", "dissimilarity", "alpha", "sampler", "include_bias")
_REPORT_KEYS = ("drop_unconverged", "max_weight")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def _check_keys(table: dict, allowed, where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ValueError(f"{where}.{key}: unknown key; allowed keys in [{where}] are {', '.join(allowed)}"
                             if where else f"[{key}]: unknown section; allowed sections are {', '.join(allowed)}")


def _table(raw: dict, key: str, where: str, required: bool) -> dict:
    if key not in raw:
        if required:
            raise ValueError(f"[{key}]: missing section" if not where else f"{where}.{key}: missing")
        return {}
    value = raw[key]
    if not isinstance(value, dict):
        name = f"{where}.{key}" if where else key
        raise ValueError(f"{name}: must be a table, got {_type_name(value)}")
    return value


def _string(table: dict, key: str, where: str, default=None, required: bool = False) -> str:
    if key not in table:
        if required:
            raise ValueError(f"{where}.{key}: missing (a string)")
        return default
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}.{key}: must be a non-empty string, got {value!r}")
    return value


def _choice_list(table: dict, key: str, where: str, choices, what: str, hints: dict | None = None) -> tuple:
    if key not in table:
        raise ValueError(f"{where}.{key}: missing (a list of {what}s from {', '.join(choices)})")
    values = table[key]
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}.{key}: must be a non-empty list of strings, got {values!r}")
    for v in values:
        if not isinstance(v, str):
            raise ValueError(f"{where}.{key}: entries must be strings, got {v!r}")
        if v not in choices:
            hint = (hints or {}).get(v, "")
            raise ValueError(f"{where}.{key}: unknown {what} {v!r}; choose from {', '.join(choices)}{hint}")
    if len(set(values)) != len(values):
        raise ValueError(f"{where}.{key}: duplicate entries in {values!r}")
    return tuple(values)


def _count(table: dict, key: str, where: str) -> int | None:
    """Optional non-negative integer; 0 or absent mean "all"."""
    if key not in table:
        return None
    v = table[key]
    if not _is_int(v) or v < 0:
        raise ValueError(f"{where}.{key}: must be a non-negative integer (0: all), got {v!r}")
    return v or None


@dataclass(frozen=True)
class RegulariserSettings:
    """How the regulariser is computed for one network.

    sampler : ``{"kind": "all"}``, ``{"kind": "importance", "p": p}`` or ``{"kind": "random", "p": p}``.
    """

    backend: str = "torch"
    dissimilarity: str = "abs_correlation"
    alpha: float = 0.5
    sampler: tuple = (("kind", "all"),)
    include_bias: bool = False  # L1/L2 over the biases too

    @property
    def sampler_dict(self) -> dict:
        return dict(self.sampler)

    def sampler_label(self) -> str:
        s = self.sampler_dict
        return s["kind"] if s["kind"] == "all" else f"{s['kind']}(p={s['p']:g})"

    def build_sampler(self, seed: int):
        """The :mod:`toponeuro.sampling` sampler (``None`` for all neurons); a random one seeded with ``seed``."""
        from .. import sampling

        s = self.sampler_dict
        if s["kind"] == "all":
            return None
        if s["kind"] == "importance":
            return sampling.ImportanceSampler(s["p"])
        return sampling.RandomSampler(s["p"], seed=seed)


def _parse_sampler(value, where: str) -> tuple:
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: must be a table like {{ kind = \"importance\", p = 0.01 }}, got {value!r}")
    for key in value:
        if key not in ("kind", "p"):
            raise ValueError(f"{where}.{key}: unknown key; a sampler has kind and p")
    kind = value.get("kind")
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"{where}.kind: unknown sampler {kind!r}; choose from {', '.join(SAMPLER_KINDS)}")
    if kind == "all":
        if "p" in value:
            raise ValueError(f"{where}.p: the 'all' sampler takes no p (it keeps every neuron)")
        return (("kind", "all"),)
    if "p" not in value:
        raise ValueError(f"{where}.p: missing; the {kind!r} sampler needs a fraction p in (0, 1]")
    p = value["p"]
    if not _is_number(p) or not 0 < p <= 1:
        raise ValueError(f"{where}.p: must be a fraction in (0, 1], got {p!r}")
    return (("kind", kind), ("p", float(p)))


def _parse_regulariser(table: dict, where: str, base: RegulariserSettings) -> RegulariserSettings:
    from .. import dissimilarity, persistence

    backend = _string(table, "backend", where, base.backend)
    if backend not in persistence.BACKENDS:
        raise ValueError(f"{where}.backend: unknown backend {backend!r}; choose from {', '.join(persistence.BACKENDS)}")
    name = _string(table, "dissimilarity", where, base.dissimilarity)
    if name not in dissimilarity.DISSIMILARITIES:
        raise ValueError(f"{where}.dissimilarity: unknown dissimilarity {name!r}; choose from "
                         f"{', '.join(dissimilarity.DISSIMILARITIES)}")
    alpha = table.get("alpha", base.alpha)
    if not _is_number(alpha) or not 0 <= alpha <= 1:
        raise ValueError(f"{where}.alpha: must be a number in [0, 1], got {alpha!r}")
    sampler = _parse_sampler(table["sampler"], f"{where}.sampler") if "sampler" in table else base.sampler
    include_bias = table.get("include_bias", base.include_bias)
    if not isinstance(include_bias, bool):
        raise ValueError(f"{where}.include_bias: must be true or false, got {include_bias!r}")
    return RegulariserSettings(backend=backend, dissimilarity=name, alpha=float(alpha), sampler=sampler,
                               include_bias=include_bias)


@dataclass(frozen=True)
class ReportSettings:
    """How the report treats the runs (section ``[report]``); nothing here changes a run.

    drop_unconverged : drop a weight of a (network, method) where one of its runs did not converge.
    max_weight : ``((method, largest weight kept), ...)``; weights above it are dropped for that method.
    """

    drop_unconverged: bool = False
    max_weight: tuple = ()

    @property
    def max_weight_dict(self) -> dict:
        return dict(self.max_weight)


def _parse_report(table: dict) -> ReportSettings:
    _check_keys(table, _REPORT_KEYS, "report")
    drop = table.get("drop_unconverged", False)
    if not isinstance(drop, bool):
        raise ValueError(f"report.drop_unconverged: must be true or false, got {drop!r}")
    caps = table.get("max_weight", {})
    if not isinstance(caps, dict):
        raise ValueError(f"report.max_weight: must be a table like {{ l1 = 5, l2 = 10 }}, got {caps!r}")
    for method, cap in caps.items():
        if method not in GRID_METHODS or method == "none":
            raise ValueError(f"report.max_weight.{method}: unknown weighted method; choose from "
                             f"{', '.join(m for m in GRID_METHODS if m != 'none')}")
        if not _is_number(cap) or not math.isfinite(cap) or cap < 0:
            raise ValueError(f"report.max_weight.{method}: must be a finite number >= 0, got {cap!r}")
    return ReportSettings(drop_unconverged=drop,
                          max_weight=tuple((m, float(caps[m])) for m in GRID_METHODS if m in caps))


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid; ``key`` identifies it in ``runs.csv``."""

    dataset: str
    network: str
    method: str
    weight: float
    seed: int

    @property
    def key(self) -> tuple:
        return (self.dataset, self.network, self.method, float(self.weight), int(self.seed))

    @property
    def run_id(self) -> str:
        return f"{self.dataset}_{self.network}_{self.method}_w{self.weight:g}_s{self.seed}"


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment config (see the module docstring for the TOML layout)."""

    name: str
    dataset: str
    networks: tuple
    methods: tuple
    weights: tuple
    seeds: tuple
    training: TrainConfig = field(default_factory=TrainConfig)
    regulariser: RegulariserSettings = field(default_factory=RegulariserSettings)
    per_network: tuple = ()  # ((network, RegulariserSettings), ...)
    description: str = ""
    limit: int | None = None
    val_limit: int | None = None
    test_limit: int | None = None
    pixel_scale: str = "1/255"  # "1/255^2": the reference code's double division
    init: str = "torch"  # "glorot": the authors' Keras initialisation
    report: ReportSettings = field(default_factory=ReportSettings)
    source: str = ""  # the file it came from
    text: str = ""  # its TOML text, saved beside the results

    def regulariser_for(self, network: str) -> RegulariserSettings:
        return dict(self.per_network).get(network, self.regulariser)

    def runs(self) -> list[RunSpec]:
        """Every run of the grid, seed-major (a whole seed finishes before the next starts).

        ``none`` runs once per network and seed with weight 0.
        """
        out = []
        for seed in self.seeds:
            for network in self.networks:
                for method in self.methods:
                    weights = self.weights if method in WEIGHTED_METHODS else (0.0,)
                    for w in weights:
                        out.append(RunSpec(self.dataset, network, method, float(w), int(seed)))
        return out


def shipped_configs() -> dict[str, Path]:
    """The configs shipped with the package: name -> path."""
    folder = resources.files("toponeuro.experiments") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def load_config(path_or_name) -> ExperimentConfig:
    """Read and validate a config from a path, or by the name of a shipped config (``"mnist-quick"``)."""
    path = Path(path_or_name)
    if not path.is_file():
        shipped = shipped_configs()
        name = path.name[:-5] if path.name.endswith(".toml") else path.name
        if str(path_or_name) in shipped or (name in shipped and path.parent == Path(".")):
            path = shipped[name]
        else:
            raise ValueError(f"config {str(path_or_name)!r} is neither a file nor a shipped config; "
                             f"shipped configs: {', '.join(sorted(shipped))}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {err.start}); a config is TOML text") from None
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<string>") -> ExperimentConfig:
    """Validate TOML text into an :class:`ExperimentConfig`; ``ValueError`` naming the offending key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{source}: not valid TOML: {err}") from err
    _check_keys(raw, _SECTIONS, "")

    exp = _table(raw, "experiment", "", required=True)
    _check_keys(exp, _EXPERIMENT_KEYS, "experiment")
    name = _string(exp, "name", "experiment", required=True)
    if any(c in name for c in "/\\") or name in (".", ".."):
        raise ValueError(f"experiment.name: must be a plain folder name (no slashes), got {name!r}")
    if not name.isprintable():  # a NUL cannot be in a path; a newline or tab would be hard to type back
        raise ValueError(f"experiment.name: must be a plain folder name (no control characters), got {name!r}")
    dataset = _string(exp, "dataset", "experiment", required=True)
    if dataset not in DATASETS:
        raise ValueError(f"experiment.dataset: unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    description = exp.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"experiment.description: must be a string, got {_type_name(description)}")

    pixel_scale = _string(exp, "pixel_scale", "experiment", "1/255")
    if pixel_scale not in data.PIXEL_SCALES:
        raise ValueError(f"experiment.pixel_scale: unknown scale {pixel_scale!r}; choose from "
                         f"{', '.join(data.PIXEL_SCALES)}")
    model_table = _table(raw, "model", "", required=False)
    _check_keys(model_table, _MODEL_KEYS, "model")
    init = _string(model_table, "init", "model", "torch")
    if init not in models.INITS:
        raise ValueError(f"model.init: unknown initialisation {init!r}; choose from {', '.join(models.INITS)}")

    grid = _table(raw, "grid", "", required=True)
    _check_keys(grid, _GRID_KEYS, "grid")
    networks = _choice_list(grid, "networks", "grid", NETWORKS, "network")
    methods = _choice_list(grid, "methods", "grid", GRID_METHODS, "method", hints={
        "dropout": " (the dropout baseline is a network: add 'mlp-dropout' to grid.networks; "
                   "its method 'none' row is the dropout baseline)"})
    if "weights" not in grid:
        raise ValueError("grid.weights: missing (a list of regulariser weights >= 0)")
    weights = grid["weights"]
    if not isinstance(weights, list) or not weights:
        raise ValueError(f"grid.weights: must be a non-empty list of numbers, got {weights!r}")
    for w in weights:
        if not _is_number(w) or not math.isfinite(w) or w < 0:
            raise ValueError(f"grid.weights: entries must be finite numbers >= 0, got {w!r}")
    weights = tuple(float(w) for w in weights)
    if len(set(weights)) != len(weights):
        raise ValueError(f"grid.weights: duplicate entries in {list(weights)}")
    if "seeds" not in grid:
        raise ValueError("grid.seeds: missing (a list of non-negative integers)")
    seeds = grid["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
        raise ValueError(f"grid.seeds: must be a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"grid.seeds: duplicate entries in {seeds}")

    train_table = _table(raw, "training", "", required=False)
    allowed = tuple(n for n in TrainConfig.field_names())
    _check_keys(train_table, allowed, "training")
    floats = ("lr", "momentum", "lr_decay")
    for key, value in train_table.items():
        expected_int = key not in floats and key != "nesterov"
        if key == "nesterov" and not isinstance(value, bool):
            raise ValueError(f"training.nesterov: must be true or false, got {value!r}")
        if key in floats and not _is_number(value):
            raise ValueError(f"training.{key}: must be a number, got {_type_name(value)} {value!r}")
        if expected_int and not _is_int(value):
            raise ValueError(f"training.{key}: must be an integer, got {_type_name(value)} {value!r}")
    try:
        training = TrainConfig(**{k: (float(v) if k in floats else v) for k, v in train_table.items()})
    except ValueError as err:
        raise ValueError(f"training: {err}".replace("TrainConfig.", "training.")) from err

    reg_table = _table(raw, "regulariser", "", required=False)
    _check_keys(reg_table, _REGULARISER_KEYS + ("networks",), "regulariser")
    regulariser = _parse_regulariser(reg_table, "regulariser", RegulariserSettings())
    per_network = []
    overrides = _table(reg_table, "networks", "regulariser", required=False)
    for net, table in overrides.items():
        where = f"regulariser.networks.{net}"
        if net not in NETWORKS:
            raise ValueError(f"{where}: unknown network {net!r}; choose from {', '.join(NETWORKS)}")
        if not isinstance(table, dict):
            raise ValueError(f"{where}: must be a table, got {_type_name(table)}")
        _check_keys(table, _REGULARISER_KEYS, where)
        per_network.append((net, _parse_regulariser(table, where, regulariser)))

    return ExperimentConfig(
        name=name, dataset=dataset, networks=networks, methods=methods, weights=weights,
        seeds=tuple(seeds), training=training, regulariser=regulariser, per_network=tuple(per_network),
        description=description, limit=_count(exp, "limit", "experiment"),
        val_limit=_count(exp, "val_limit", "experiment"), test_limit=_count(exp, "test_limit", "experiment"),
        pixel_scale=pixel_scale, init=init, report=_parse_report(_table(raw, "report", "", required=False)),
        source=source, text=text,
    )
