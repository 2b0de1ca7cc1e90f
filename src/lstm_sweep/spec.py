"""The sweep file: schema, defaults, validation with precise errors, conversion to Optuna distributions.

`parse_sweep` is a pure function from what `yaml.safe_load` returned to a frozen `SweepSpec`; it collects
every problem it finds and raises one `SweepFileError` whose `.problems` has one line per problem, each shaped
`<file>: <key.path>: got <value>, expected <what is allowed>`. `load_sweep` reads and parses a file.

A sweep file looks like::

    name: plateau
    sampler: grid            # grid | random | qmc | tpe
    replicates: 2
    fixed: {task: cycle, epochs: 20}
    factors:
      learning_rate: {role: nuisance, values: [0.001, 0.01, 0.1]}
      grad_noise: {low: 0.0, high: 0.1, step: 0.05}
      momentum: {role: fixed, value: 0.9}
    thresholds: {escape_skill: 0.5}

Momentum is conditional: adam ignores it, so it is never sampled (nor gridded) for adam configurations.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Literal, TypeGuard

import optuna
import yaml

from lstm_sweep.config import FACTORS, SETTINGS, Factor, TrialConfig
from lstm_sweep.errors import ConfigError, SweepFileError
from lstm_sweep.metrics import DEFAULT_EPOCH_METRICS, EPOCH_METRICS, Thresholds
from lstm_sweep.step_parts import StepParts

__all__ = [
    "MAX_GRID_CELLS",
    "MAX_REPLICATES",
    "ROLES",
    "SAMPLERS",
    "Domain",
    "FactorSpec",
    "Role",
    "SamplerName",
    "SweepSpec",
    "load_sweep",
    "mask_url",
    "parse_sweep",
]

Role = Literal["scientific", "nuisance", "fixed"]
SamplerName = Literal["grid", "random", "qmc", "tpe"]
ROLES: tuple[Role, ...] = ("scientific", "nuisance", "fixed")
SAMPLERS: tuple[SamplerName, ...] = ("grid", "random", "qmc", "tpe")
MAX_GRID_CELLS = 100_000
MAX_REPLICATES = 100

TOP_KEYS = (
    "name",
    "description",
    "seed",
    "sampler",
    "trials",
    "replicates",
    "fixed",
    "factors",
    "thresholds",
    "storage",
    "tracking_uri",
    "epoch_metrics",
)
DEFINITION_KEYS = ("role", "values", "low", "high", "log", "step", "value")
FIXED_KEYS = (*FACTORS, *(name for name in SETTINGS if name != "seed"), "text_path")
THRESHOLD_KEYS = tuple(f.name for f in dataclasses.fields(Thresholds))
DEFAULT_TRACKING_URI = "sqlite:///results/mlflow.db"
STEP_PART_FACTORS = ("optimizer", "grad_noise", "grad_noise_schedule", "grad_clip")  # what decides `StepParts`
DEFAULT_OPTIMIZER: str = TrialConfig.optimizer
# Factor order used everywhere (grid cells, suggest): the table order, with optimizer moved before momentum so
# that the conditional momentum can look at the optimizer already chosen.
FACTOR_ORDER: tuple[str, ...] = tuple(
    itertools.chain.from_iterable(
        ("optimizer", "momentum") if n == "momentum" else () if n == "optimizer" else (n,) for n in FACTORS
    )
)
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
NAME_MAX_LENGTH = 128  # a study name also names its results/<name>/ directory and MLflow experiment


def name_allowed(max_length: int = NAME_MAX_LENGTH) -> str:
    """What `is_valid_name` accepts, worded for the `expected ...` part of an error."""
    return f"a name of letters, digits, '_', '.', '-' (not only dots, at most {max_length} characters)"


def is_valid_name(name: object, max_length: int = NAME_MAX_LENGTH) -> TypeGuard[str]:
    """The one rule for sweep and study names (sweep files, `diagnose --name`): safe as a directory name
    under results/ and in a sqlite URL, so no separators, spaces or a bare `.`/`..`."""
    return (
        isinstance(name, str)
        and len(name) <= max_length
        and _NAME_RE.fullmatch(name) is not None
        and set(name) != {"."}
    )


def default_storage(name: str) -> str:
    """Where a sweep's Optuna study lives unless the file says otherwise."""
    return f"sqlite:///results/{name}/optuna.db"


# --- typed result


@dataclass(frozen=True)
class Domain:
    """The values a varied factor may take: a list of `values`, or a `low`..`high` range (optional log/step).

    Range bounds are ints for int factors and floats for float factors (as `Factor.check` coerces them).
    """

    values: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def is_integer(self) -> bool:
        """A range of int bounds (and int step): enumerated with range()."""
        return (
            self.values is None
            and isinstance(self.low, int)
            and isinstance(self.high, int)
            and (self.step is None or isinstance(self.step, int))
        )

    @property
    def is_enumerable(self) -> bool:
        """True for values, int ranges and float ranges with a step: what a grid can walk."""
        return self.values is not None or self.is_integer or self.step is not None

    def size(self) -> int | None:
        """Number of values enumerate() would give, computed without enumerating; None if not enumerable."""
        if self.values is not None:
            return len(self.values)
        if not self.is_enumerable:
            return None
        return self._steps() + 1

    def _steps(self) -> int:
        assert self.low is not None and self.high is not None
        if self.is_integer:
            return (int(self.high) - int(self.low)) // int(self.step or 1)
        assert self.step is not None
        return math.floor((self.high - self.low) / self.step + 1e-9)

    @property
    def top(self) -> float:
        """The largest value the range reaches: `high`, or the last step at or below it."""
        assert self.low is not None and self.high is not None
        if self.step is None:
            return self.high
        if self.is_integer:
            return int(self.low) + self._steps() * int(self.step)
        return self._float_at(self._steps())

    def _float_at(self, i: int) -> float:
        assert self.low is not None and self.step is not None
        digits = max(_decimals(self.low), _decimals(self.step))
        return float(round(self.low + i * self.step, digits))

    def enumerate(self) -> list[Any]:
        """Every value, in order; a stepped range includes `high` when a step lands on it."""
        if self.values is not None:
            return list(self.values)
        if not self.is_enumerable:
            raise ValueError("a float range without step cannot be enumerated")
        assert self.low is not None and self.high is not None
        if self.is_integer:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        return [self._float_at(i) for i in range(self._steps() + 1)]

    def to_distribution(self, factor: Factor) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution of this domain for `factor` (categorical, int or float)."""
        if self.values is not None:
            return optuna.distributions.CategoricalDistribution(list(self.values))
        assert self.low is not None and self.high is not None
        if factor.kind == "int":
            step = int(self.step or 1)
            top = int(self.low) + (int(self.high) - int(self.low)) // step * step
            return optuna.distributions.IntDistribution(int(self.low), top, log=self.log, step=step)
        # The top is pre-adjusted to the last step so Optuna has nothing to warn about.
        return optuna.distributions.FloatDistribution(
            float(self.low),
            float(self.top),
            log=self.log,
            step=None if self.step is None else float(self.step),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form: {"values": [...]} or {"low", "high", "log", "step"}."""
        if self.values is not None:
            return {"values": list(self.values)}
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step}


def _decimals(x: float) -> int:
    exponent = Decimal(repr(x)).as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


@dataclass(frozen=True)
class FactorSpec:
    """One factor of the sweep: its role and either a domain (varied) or a value (role fixed)."""

    name: str
    role: Role
    domain: Domain | None = None
    value: Any = None

    @property
    def factor(self) -> Factor:
        return FACTORS[self.name]

    @property
    def varied(self) -> bool:
        return self.role != "fixed"

    def to_dict(self) -> dict[str, Any]:
        """JSON form: {"role", "values"}, {"role", "low", "high", "log", "step"} or {"role", "value"}."""
        if self.domain is None:
            return {"role": self.role, "value": self.value}
        return {"role": self.role, **self.domain.to_dict()}


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file with every default filled in."""

    name: str
    description: str
    source: str
    seed: int
    sampler: SamplerName
    trials: int  # configurations to run; for grid, at most `cells` (clamped)
    replicates: int
    fixed: Mapping[str, Any]
    factors: tuple[FactorSpec, ...]
    thresholds: Thresholds
    storage: str
    tracking_uri: str
    epoch_metrics: tuple[str, ...] = DEFAULT_EPOCH_METRICS  # charted per epoch in MLflow (every run keeps all)
    cells: int | None = None  # grid size (momentum collapsed for adam) when the space is enumerable

    # --- roles and values

    def varied(self) -> tuple[FactorSpec, ...]:
        """The factors sampled or gridded over (role scientific or nuisance), optimizer before momentum."""
        return tuple(fs for fs in self.factors if fs.varied)

    def scientific(self) -> tuple[FactorSpec, ...]:
        return tuple(fs for fs in self.factors if fs.role == "scientific")

    def nuisance(self) -> tuple[FactorSpec, ...]:
        return tuple(fs for fs in self.factors if fs.role == "nuisance")

    def fixed_values(self) -> dict[str, Any]:
        """Every value held constant: the `fixed` section plus factors of role fixed."""
        values = dict(self.fixed)
        values.update({fs.name: fs.value for fs in self.factors if fs.role == "fixed"})
        return values

    def step_parts(self) -> StepParts:
        """The optional step parts (Adam, noise schedules, clipping) any configuration of this sweep may need: the
        combinations of the values its optimizer, noise and clipping may take. A range counts by its ends, which
        is enough (only whether noise and clipping are above 0 matters, and ranges start at 0 or more) and keeps
        a fine-stepped range from becoming millions of combinations."""
        fixed = self.fixed_values()
        varied = {fs.name: fs.domain for fs in self.varied() if fs.domain is not None}
        options: dict[str, list[Any]] = {}
        for name in STEP_PART_FACTORS:
            domain = varied.get(name)
            if domain is None:
                options[name] = [fixed.get(name, getattr(TrialConfig, name))]
            else:
                options[name] = sorted(set(domain.values), key=str) if domain.values else [domain.low, domain.top]
        combos = itertools.product(*options.values())
        return StepParts.of([TrialConfig().replace(**dict(zip(options, combo, strict=True))) for combo in combos])

    def _fixed_optimizer(self) -> str:
        return str(self.fixed_values().get("optimizer", DEFAULT_OPTIMIZER))

    # --- the grid

    def grid_cells(self) -> list[dict[str, Any]]:
        """Cartesian product of the varied domains in factor order; adam cells drop momentum (deduped)."""
        varied = self.varied()
        for fs in varied:
            assert fs.domain is not None
            if not fs.domain.is_enumerable:
                raise ConfigError(
                    f"factors.{fs.name}", fs.domain.to_dict(), "an enumerable domain for a grid", self.source
                )
        names = [fs.name for fs in varied]
        lists = [fs.domain.enumerate() for fs in varied if fs.domain is not None]
        fixed_optimizer = self._fixed_optimizer()
        seen: set[tuple[tuple[str, Any], ...]] = set()
        cells: list[dict[str, Any]] = []
        for combo in itertools.product(*lists):
            cell = dict(zip(names, combo, strict=True))
            if "momentum" in cell and cell.get("optimizer", fixed_optimizer) == "adam":
                del cell["momentum"]
            key = tuple(cell.items())
            if key not in seen:
                seen.add(key)
                cells.append(cell)
        return cells

    def n_configs(self) -> int:
        """Configurations the sweep runs: the grid cells (clamped by `trials`), or `trials`."""
        return self.trials

    def n_runs(self) -> int:
        """Training runs: configurations times replicates."""
        return self.n_configs() * self.replicates

    # --- optuna

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """The Optuna distribution of every varied factor (momentum included: conditional on optimizer)."""
        return {fs.name: fs.domain.to_distribution(fs.factor) for fs in self.varied() if fs.domain is not None}

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Define-by-run sampling of the varied factors; momentum is not suggested when optimizer is adam."""
        fixed_optimizer = self._fixed_optimizer()
        params: dict[str, Any] = {}
        for fs in self.varied():
            assert fs.domain is not None
            if fs.name == "momentum" and params.get("optimizer", fixed_optimizer) == "adam":
                continue
            params[fs.name] = _suggest_one(trial, fs.name, fs.domain, fs.factor)
        return params

    def config_for(self, params: Mapping[str, Any], replicate: int) -> TrialConfig:
        """The TrialConfig of one replicate: fixed values, then params, seed = spec seed + replicate."""
        if isinstance(replicate, bool) or not isinstance(replicate, int) or not 0 <= replicate < self.replicates:
            raise ConfigError("replicate", replicate, f"an integer in 0..{self.replicates - 1}", self.source)
        values = {**self.fixed_values(), **params, "seed": self.seed + replicate}
        return TrialConfig.from_mapping(values, source=self.source)

    def sampler_for(self) -> optuna.samplers.BaseSampler:
        """The Optuna sampler, seeded with the sweep seed.

        grid uses a RandomSampler: the driver enqueues the grid cells itself, so it is never asked to sample.
        tpe is multivariate with group=True (momentum is conditional, so the space is dynamic); qmc falls
        back to independent sampling for categorical and conditional parameters by design (warning off).
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self.sampler == "qmc":
                return optuna.samplers.QMCSampler(scramble=True, seed=self.seed, warn_independent_sampling=False)
            if self.sampler == "tpe":
                return optuna.samplers.TPESampler(seed=self.seed, multivariate=True, group=True)
            return optuna.samplers.RandomSampler(seed=self.seed)

    # --- rendering

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec, JSON-serialisable, with passwords in storage URLs masked."""
        conditional = {}
        if any(fs.name == "momentum" for fs in self.varied()):
            conditional["momentum"] = "sampled only when optimizer is momentum (adam ignores it)"
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "seed": self.seed,
            "sampler": self.sampler,
            "trials": self.trials,
            "cells": self.cells,
            "replicates": self.replicates,
            "n_configs": self.n_configs(),
            "n_runs": self.n_runs(),
            "fixed": dict(self.fixed),
            "factors": {fs.name: fs.to_dict() for fs in self.factors},
            "conditional": conditional,
            "thresholds": self.thresholds.as_dict(),
            "storage": mask_url(self.storage),
            "tracking_uri": mask_url(self.tracking_uri),
            "epoch_metrics": list(self.epoch_metrics),
        }


def _suggest_one(trial: optuna.trial.BaseTrial, name: str, domain: Domain, factor: Factor) -> Any:
    if domain.values is not None:
        return trial.suggest_categorical(name, list(domain.values))
    assert domain.low is not None and domain.high is not None
    if factor.kind == "int":
        step = int(domain.step or 1)
        return trial.suggest_int(name, int(domain.low), int(domain.top), step=step, log=domain.log)
    return trial.suggest_float(name, float(domain.low), float(domain.top), step=domain.step, log=domain.log)


# --- URL masking

_PASSWORD_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@?#\s]*:)(?P<password>\S+)(?P<tail>@)")


def mask_url(text: str) -> str:
    """`text` with the password of every URL in it (scheme://user:password@host/...) replaced by ***.

    Works on a bare URL and on free text such as a database error message that quotes one."""
    return _PASSWORD_RE.sub(r"\g<head>***\g<tail>", text)


# --- loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads 1e-3 as a float (YAML 1.2), not the string '1e-3'."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and parse a sweep file; unreadable file or bad YAML: one SweepFileError line naming the file."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err.__class__.__name__
        raise SweepFileError(f"{source}: cannot read the sweep file: {reason}", source=source) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise SweepFileError(_yaml_problem(source, err), source=source) from None
    return parse_sweep(data, source)


def _yaml_problem(source: str, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    text = f"{problem} ({context})" if context and mark is not None else problem
    return f"{source}: {where}invalid YAML: {' '.join(str(text).split())}"


# --- parsing


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: object) -> str:
    text = mask_url(repr(value))  # a bad value may quote a URL with a password: mask before truncating
    return text if len(text) <= 80 else text[:77] + "..."


class _Problems:
    """Collects one-line problems `<source>: <path>: ...`."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def bad(self, path: str, value: object, expected: str) -> None:
        self.lines.append(f"{self.source}: {path}: got {_short(value)}, expected {expected}")

    def got(self, path: str, got: str, expected: str) -> None:
        """A problem whose `got` part is a description rather than a value."""
        self.lines.append(f"{self.source}: {path}: got {got}, expected {expected}")

    def missing(self, path: str, expected: str) -> None:
        self.lines.append(f"{self.source}: {path}: missing, expected {expected}")

    def unknown(self, path: str, key: object, what: str, options: Sequence[str]) -> None:
        line = f"{self.source}: {path}: unknown {what}, expected one of {', '.join(options)}"
        match = difflib.get_close_matches(str(key), options, n=1)
        if match:
            line += f"; did you mean {match[0]}?"
        self.lines.append(line)

    def check(self, factor: Factor, value: object, path: str) -> tuple[bool, Any]:
        """Factor.check, recording the problem; a numeric string gets a hint."""
        try:
            return True, factor.check(value, key=path)
        except ConfigError as err:
            expected = err.allowed
            if factor.kind in ("int", "float") and isinstance(value, str) and _parses_as_float(value):
                expected += " (write it as a number, not a string)"
            self.bad(path, value, expected)
            return False, None


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _key(key: object) -> str:
    """A key as shown in a problem line: repr() unless it is printable text (a control character such as
    \\x1e would otherwise split the one-line problem into two)."""
    text = str(key)
    return text if text.isprintable() and text.strip() == text and text else repr(key)


def _join(path: str, key: object) -> str:
    return f"{path}.{_key(key)}" if path else _key(key)


def parse_sweep(data: object, source: str) -> SweepSpec:
    """Validate a loaded sweep document and resolve its defaults; every problem found goes into one error."""
    problems = _Problems(source)
    if not isinstance(data, Mapping):
        problems.bad("(top level)", data, "a mapping of sweep keys (at least name and factors)")
        raise SweepFileError(problems.lines, source=source)
    for key in data:
        if key not in TOP_KEYS:
            problems.unknown(_key(key), key, "key", TOP_KEYS)

    name = _parse_name(data, problems)
    description = data.get("description")
    if description is None:
        description = ""
    elif not isinstance(description, str):
        problems.bad("description", description, "free text")
        description = ""
    else:
        description = mask_url(description)  # shown by validate, logged to MLflow and the study: no passwords

    sampler = data.get("sampler", "grid")
    if sampler not in SAMPLERS:
        problems.bad("sampler", sampler, "one of " + ", ".join(SAMPLERS))
        sampler = "grid"

    replicates = data.get("replicates", 1)
    if not _is_int(replicates) or not 1 <= replicates <= MAX_REPLICATES:
        problems.bad("replicates", replicates, f"an integer from 1 to {MAX_REPLICATES}")
        replicates = 1

    seed_factor = SETTINGS["seed"]
    seed_ok, seed = problems.check(seed_factor, data.get("seed", 0), "seed")
    if not seed_ok:
        seed = 0
    elif seed_factor.high is not None and seed + replicates - 1 > seed_factor.high:
        problems.bad("seed", seed, f"seed + replicates - 1 <= {int(seed_factor.high)} (replicate r uses seed + r)")

    trials = data.get("trials")
    if trials is not None and (not _is_int(trials) or trials < 1):
        problems.bad("trials", trials, "an integer >= 1")
        trials = None
    elif trials is None and sampler != "grid":
        problems.missing("trials", f"an integer >= 1 (required for sampler {sampler})")

    fixed, fixed_ok = _parse_fixed(data.get("fixed"), problems)
    factors, factors_ok = _parse_factors(data.get("factors"), fixed, problems)
    cells = _check_space(factors, fixed, sampler, problems) if factors_ok else None
    if fixed_ok and factors_ok:
        _check_fixed_config(fixed, factors, problems)

    thresholds = _parse_thresholds(data.get("thresholds"), problems)
    storage = _parse_url(data, "storage", default_storage(name or "sweep"), problems)
    tracking_uri = _parse_url(data, "tracking_uri", DEFAULT_TRACKING_URI, problems)
    epoch_metrics = _parse_epoch_metrics(data.get("epoch_metrics"), problems)

    if problems.lines:
        raise SweepFileError(problems.lines, source=source)
    assert name is not None
    if sampler == "grid":
        assert cells is not None
        trials = cells if trials is None else min(trials, cells)
    assert trials is not None
    return SweepSpec(
        name=name,
        description=description,
        source=source,
        seed=seed,
        sampler=sampler,
        trials=trials,
        replicates=replicates,
        fixed=MappingProxyType(fixed),
        factors=factors,
        thresholds=thresholds,
        storage=storage,
        tracking_uri=tracking_uri,
        epoch_metrics=epoch_metrics,
        cells=cells,
    )


def _parse_name(data: Mapping[Any, Any], problems: _Problems) -> str | None:
    if "name" not in data:
        problems.missing("name", name_allowed())
        return None
    name = data["name"]
    if not is_valid_name(name):
        problems.bad("name", name, name_allowed())
        return None
    return name


def _parse_fixed(section: object, problems: _Problems) -> tuple[dict[str, Any], bool]:
    """The `fixed` section, values coerced; False when something in it was bad."""
    if section is None:
        return {}, True
    if not isinstance(section, Mapping):
        problems.bad("fixed", section, "a mapping of factor or setting names to values")
        return {}, False
    fixed: dict[str, Any] = {}
    ok = True
    for key, value in section.items():
        path = _join("fixed", key)
        if key == "seed":
            problems.bad(path, value, "no seed here: replicates own it (set the top-level seed instead)")
            ok = False
        elif key == "text_path":
            if isinstance(value, str) and value:
                fixed[key] = value
            else:
                problems.bad(path, value, "a path to a text file")
                ok = False
        elif key in FACTORS or key in SETTINGS:
            good, coerced = problems.check(FACTORS.get(key) or SETTINGS[key], value, path)
            if good:
                fixed[key] = coerced
            ok = ok and good
        else:
            problems.unknown(path, key, "factor or setting", FIXED_KEYS)
            ok = False
    return fixed, ok


def _parse_factors(
    section: object, fixed: Mapping[str, Any], problems: _Problems
) -> tuple[tuple[FactorSpec, ...], bool]:
    """The `factors` section in FACTOR_ORDER; False when something in it was bad."""
    if section is None:
        return (), True
    if not isinstance(section, Mapping):
        problems.bad("factors", section, "a mapping of factor names to definitions")
        return (), False
    specs: dict[str, FactorSpec] = {}
    ok = True
    for name, definition in section.items():
        path = _join("factors", name)
        if name not in FACTORS:
            problems.unknown(path, name, "factor", tuple(FACTORS))
            ok = False
            continue
        if name in fixed:
            problems.bad(path, definition, "a factor in either fixed or factors, not both (it is also in fixed)")
            ok = False
            continue
        spec = _parse_definition(name, definition, path, problems)
        if spec is None:
            ok = False
        else:
            specs[name] = spec
    return tuple(specs[n] for n in FACTOR_ORDER if n in specs), ok


_DEFINITION_ALLOWED = "a mapping with values: [...] or low/high (role fixed: value)"


def _parse_definition(name: str, definition: object, path: str, problems: _Problems) -> FactorSpec | None:
    factor = FACTORS[name]
    if not isinstance(definition, Mapping):
        problems.bad(path, definition, _DEFINITION_ALLOWED)
        return None
    start = len(problems.lines)
    for key in definition:
        if key not in DEFINITION_KEYS:
            problems.unknown(_join(path, key), key, "key", DEFINITION_KEYS)
    role = definition.get("role", "scientific")
    if role not in ROLES:
        problems.bad(f"{path}.role", role, "one of " + ", ".join(ROLES))
        return None

    if role == "fixed":
        for key in ("values", "low", "high", "log", "step"):
            if key in definition:
                problems.bad(f"{path}.{key}", definition[key], "no domain with role fixed (it takes one value)")
        if "value" not in definition:
            problems.missing(f"{path}.value", f"{factor.allowed} (role fixed takes one value)")
            return None
        good, value = problems.check(factor, definition["value"], f"{path}.value")
        if not good or len(problems.lines) > start:
            return None
        return FactorSpec(name, "fixed", None, value)

    if "value" in definition:
        problems.bad(f"{path}.value", definition["value"], "values: [...] or low/high (only role fixed takes value)")
    has_values = "values" in definition
    has_range = "low" in definition or "high" in definition
    domain: Domain | None = None
    if has_values and has_range:
        problems.bad(path, dict(definition), "either values or low/high, not both")
    elif has_values:
        for key in ("log", "step"):
            if key in definition:
                problems.bad(f"{path}.{key}", definition[key], "log/step only with low/high (not with values)")
        domain = _parse_values(factor, definition["values"], f"{path}.values", problems)
    elif has_range:
        domain = _parse_range(factor, definition, path, problems)
    else:
        problems.missing(path, f"a domain: values: [...] or low/high ({factor.allowed})")
    if domain is None or len(problems.lines) > start:
        return None
    return FactorSpec(name, role, domain, None)


def _parse_values(factor: Factor, values: object, path: str, problems: _Problems) -> Domain | None:
    if not isinstance(values, list | tuple) or not values:
        problems.bad(path, values, f"a non-empty list, each {factor.allowed}")
        return None
    coerced: list[Any] = []
    ok = True
    for i, value in enumerate(values):
        good, v = problems.check(factor, value, f"{path}[{i}]")
        if not good:
            ok = False
        elif v in coerced:
            problems.bad(f"{path}[{i}]", value, "no duplicate values")
            ok = False
        else:
            coerced.append(v)
    return Domain(values=tuple(coerced)) if ok else None


def _parse_range(factor: Factor, d: Mapping[str, Any], path: str, problems: _Problems) -> Domain | None:
    if factor.kind in ("choice", "bool"):
        key = "low" if "low" in d else "high"
        problems.bad(f"{path}.{key}", d[key], f"values: [...] for a {factor.kind} factor ({factor.allowed})")
        return None
    bounds: list[Any] = []
    ok = True
    for key in ("low", "high"):
        if key not in d:
            problems.missing(f"{path}.{key}", f"{factor.allowed} (a range needs both low and high)")
            ok = False
            continue
        good, value = problems.check(factor, d[key], f"{path}.{key}")
        ok = ok and good
        bounds.append(value)
    log = d.get("log", False)
    if not isinstance(log, bool):
        problems.bad(f"{path}.log", log, "true or false")
        ok, log = False, False
    step = d.get("step")
    int_factor = factor.kind == "int"
    if step is not None:
        if int_factor and (not _is_int(step) or step < 1):
            problems.bad(f"{path}.step", step, "an integer >= 1 (the factor is an integer)")
            ok = False
        elif not int_factor and (not _is_number(step) or step <= 0):
            problems.bad(f"{path}.step", step, "a number > 0")
            ok = False
        elif log and (not int_factor or step != 1):
            problems.bad(f"{path}.step", step, "no step with log: true (Optuna cannot combine them)")
            ok = False
    if not ok:
        return None
    low, high = bounds
    if low >= high:
        problems.bad(f"{path}.high", high, f"a value greater than low ({low})")
        return None
    if log and low <= 0:
        problems.bad(f"{path}.low", low, "a number > 0 with log: true")
        return None
    if step is not None and not int_factor and not math.isfinite((high - low) / step):
        problems.bad(f"{path}.step", step, f"a step giving a finite number of values from {low} to {high}")
        return None
    if int_factor:
        step = int(step) if step is not None else 1
    elif step is not None:
        step = float(step)
    return Domain(low=low, high=high, log=log, step=step)


def _optimizers(factors: Sequence[FactorSpec], fixed: Mapping[str, Any]) -> set[str]:
    """Every optimizer the sweep may run."""
    if "optimizer" in fixed:
        return {fixed["optimizer"]}
    for fs in factors:
        if fs.name == "optimizer":
            if fs.domain is None:
                return {fs.value}
            return set(fs.domain.values or ())
    return {DEFAULT_OPTIMIZER}


def _check_space(
    factors: tuple[FactorSpec, ...], fixed: Mapping[str, Any], sampler: str, problems: _Problems
) -> int | None:
    """Cross-factor rules; returns the number of grid cells when every varied domain is enumerable."""
    varied = {fs.name: fs for fs in factors if fs.varied}
    optimizers = _optimizers(factors, fixed)
    if "momentum" in varied and optimizers == {"adam"}:
        assert varied["momentum"].domain is not None
        problems.bad(
            "factors.momentum",
            varied["momentum"].domain.to_dict(),
            "momentum fixed or absent: optimizer is fixed to adam, which ignores momentum",
        )
        return None
    sizes: dict[str, int] = {}
    for fs in varied.values():
        assert fs.domain is not None
        size = fs.domain.size()
        if size is not None:
            sizes[fs.name] = size
        elif sampler == "grid":
            problems.bad(
                f"factors.{fs.name}",
                fs.domain.to_dict(),
                "values or a step for the grid sampler (a float range without step cannot be enumerated; "
                "or use sampler random, qmc or tpe)",
            )
    if len(sizes) < len(varied):
        return None
    cells = math.prod(n for name, n in sizes.items() if name not in ("optimizer", "momentum"))
    n_momentum = sizes.get("momentum", 1)
    if "optimizer" in varied:
        domain = varied["optimizer"].domain
        n_adam = sum(1 for v in (domain.values if domain else None) or () if v == "adam")
        cells *= (sizes["optimizer"] - n_adam) * n_momentum + n_adam
    else:
        cells *= n_momentum
    if sampler == "grid" and cells > MAX_GRID_CELLS:
        problems.got(
            "factors",
            f"{cells} grid cells",
            f"at most {MAX_GRID_CELLS} cells (huge grid: use fewer values, or sampler random, qmc or tpe)",
        )
    return cells


def _check_fixed_config(fixed: Mapping[str, Any], factors: Sequence[FactorSpec], problems: _Problems) -> None:
    """Cross-setting rules of TrialConfig (e.g. task text needs text_path) on the values held constant."""
    values = {**fixed, **{fs.name: fs.value for fs in factors if fs.role == "fixed"}}
    try:
        TrialConfig.from_mapping(values)
    except ConfigError as err:
        role_fixed = err.key in FACTORS and err.key not in fixed
        path = f"factors.{err.key}.value" if role_fixed else f"fixed.{err.key}"
        problems.bad(path, err.value, err.allowed)


def _parse_thresholds(section: object, problems: _Problems) -> Thresholds:
    if section is None:
        return Thresholds()
    if not isinstance(section, Mapping):
        problems.bad("thresholds", section, "a mapping of " + ", ".join(THRESHOLD_KEYS))
        return Thresholds()
    values: dict[str, Any] = {}
    ok = True
    for key, value in section.items():
        path = _join("thresholds", key)
        if key not in THRESHOLD_KEYS:
            problems.unknown(path, key, "threshold", THRESHOLD_KEYS)
        elif key == "collapse_symbols" and not _is_int(value):
            problems.bad(path, value, "an integer >= 1")
        elif not _is_number(value):
            problems.bad(path, value, "a number")
        elif (error := _threshold_problem(key, value)) is not None:
            problems.bad(path, value, error)
        else:
            values[key] = value if key == "collapse_symbols" else float(value)
            continue
        ok = False
    if not ok:
        return Thresholds()
    try:
        return Thresholds(**values)
    except ConfigError as err:  # a rule between fields (plateau_skill < escape_skill)
        problems.bad(err.key, err.value, err.allowed)
        return Thresholds()


def _threshold_problem(key: str, value: Any) -> str | None:
    """What is wrong with one threshold on its own (rules between fields are checked afterwards)."""
    try:
        Thresholds(**{key: value})
    except ConfigError as err:
        if err.key == f"thresholds.{key}" and not err.allowed.startswith("less than"):
            return err.allowed
    return None


def _parse_epoch_metrics(value: object, problems: _Problems) -> tuple[str, ...]:
    """`all`, one name, or a list of distinct per-epoch record keys, kept in record order; the default when absent."""
    if value is None:
        return DEFAULT_EPOCH_METRICS
    if value == "all":
        return EPOCH_METRICS
    names: list[object]
    if isinstance(value, str):
        names = [value]
    elif isinstance(value, Sequence) and value:
        names = list(value)
    else:
        problems.bad("epoch_metrics", value, "'all', one name or a list of names from " + ", ".join(EPOCH_METRICS))
        return DEFAULT_EPOCH_METRICS
    single = isinstance(value, str)
    for i, name in enumerate(names):
        path = "epoch_metrics" if single else f"epoch_metrics[{i}]"
        if name == "all":
            problems.bad(path, name, "'all' on its own (epoch_metrics: all), not in a list")
        elif not isinstance(name, str):
            problems.bad(path, name, "a name, one of " + ", ".join(EPOCH_METRICS))
        elif name not in EPOCH_METRICS:
            problems.unknown(path, name, f"name {name!r}", EPOCH_METRICS)
        elif name in names[:i]:
            problems.bad(path, name, "each name once")
    return tuple(name for name in EPOCH_METRICS if name in names)


def _parse_url(data: Mapping[Any, Any], key: str, default: str, problems: _Problems) -> str:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or "://" not in value:
        problems.bad(key, mask_url(value) if isinstance(value, str) else value, "a URL such as " + default)
        return default
    return value
