"""Where a specialty's data lives: a mixture file plus ``--data`` arguments -> rendered examples.

A specialty mixture (``config/specialties/<name>.yaml``, :func:`onevlm.specialty.tasks.load_specialty`)
names, per dataset, a reader kind and the dataset the reader reads (``source``, default: the
entry's ``dataset``). The command line says where each one is, with ``--data`` values of two forms:

``NAME=PATH``
    The file or folder of dataset ``NAME`` (an entry's ``dataset`` or its ``source``: so
    ``polypset=/data/PolypSet`` serves both the PolypSet detection entry and the
    ``polypset-classification`` entry derived from it).
``FOLDER``
    A data root searched by conventional name, ignoring case: MedMNIST entries as
    ``<source>.npz`` or ``<source>_<size>.npz`` (size 224, 128, 64 or 28; with several, the
    plain name first, then the largest size), PolypSet as a folder ``PolypSet``, DeepLesion as
    ``DeepLesion``, IDC as ``IDC`` (a folder named after the entry's ``source`` is taken too).

A dataset found nowhere is an error listing every missing dataset and the names looked for,
unless ``allow_missing`` (then it is skipped with a warning; at least one dataset must remain).

Custom datasets in MedMNIST format
----------------------------------
A ``medmnist`` entry whose ``source`` is not one of MedMNIST's sets (e.g. the synthetic shapes
set of :func:`onevlm.specialty.datasets.synthetic.write_shapes_medmnist`) describes its classes
in the entry's reader options::

    - dataset: shapesmnist
      reader: medmnist
      task: classification
      options:
        info:
          class_names: [red circle, green square, blue triangle, yellow cross]
          description: Synthetic shapes.            # optional

The ``info`` mapping becomes the reader's ``DatasetInfo`` (name: the entry's ``source``; task:
the entry's ``task``; specialty: the mixture's). Every other option goes to the reader as is.

A dataset read under a task other than its reader's own (PolypSet detection -> polyp
classification), or under another name, goes through :func:`onevlm.specialty.tasks.derive_task`.
Research use only.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from onevlm.specialty.datasets import DatasetError, read_dataset
from onevlm.specialty.datasets.medmnist import MEDMNIST_INFOS, MEDMNIST_SIZES
from onevlm.specialty.samples import SPLITS, DatasetInfo, LabelledImage
from onevlm.specialty.tasks import (
    MixtureEntry,
    SpecialtyConfig,
    SpecialtyConfigError,
    TaskExample,
    build_examples,
    default_specialties_dir,
    derive_task,
    load_specialty,
)

logger = logging.getLogger(__name__)

#: The conventional folder name of each folder-based reader kind (matched ignoring case).
FOLDER_NAMES = {"polypset": "PolypSet", "deeplesion": "DeepLesion", "idc": "IDC"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class DataSourceError(ValueError):
    """The data of a specialty cannot be found or read; the message names the dataset and the path."""


# -- the specialty ----------------------------------------------------------------------------


def resolve_specialty(spec: str | Path) -> SpecialtyConfig:
    """A specialty by shipped name (``pathology``) or mixture file path (``my/mix.yaml``).

    Raises
    ------
    SpecialtyConfigError
        If ``spec`` is neither a shipped specialty nor a readable, valid mixture file.
    """
    text = str(spec)
    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml") or path.is_file() or "/" in text:
        return load_specialty(path)
    shipped = default_specialties_dir() / f"{text}.yaml"
    if shipped.is_file():
        return load_specialty(shipped)
    known = sorted(p.stem for p in default_specialties_dir().glob("*.yaml"))
    raise SpecialtyConfigError(f"{text}: no such specialty (shipped: {', '.join(known)}) and no such mixture file")


# -- --data arguments -------------------------------------------------------------------------


@dataclass(frozen=True)
class DataArguments:
    """Parsed ``--data`` values: explicit ``NAME=PATH`` pairs (lower-case names) and data roots."""

    explicit: dict[str, Path] = field(default_factory=dict)
    roots: tuple[Path, ...] = ()


def parse_data_args(values: Iterable[str]) -> DataArguments:
    """Split ``--data`` values into ``NAME=PATH`` pairs and data-root folders.

    A value is a pair when it holds ``=`` with a plain name before it and is not itself an
    existing path. Pairs may name a missing path (reported when the dataset is resolved);
    roots must be existing folders.

    Raises
    ------
    DataSourceError
        On an empty value, a name given twice, or a root that is not an existing folder.
    """
    explicit: dict[str, Path] = {}
    roots: list[Path] = []
    for value in values:
        value = value.strip()
        if not value:
            raise DataSourceError("--data: empty value (give NAME=PATH or a data folder)")
        name, sep, rest = value.partition("=")
        if sep and _NAME.match(name.strip()) and not Path(value).exists():
            key = name.strip().lower()
            if not rest.strip():
                raise DataSourceError(f"--data {value}: no path after '='")
            if key in explicit:
                raise DataSourceError(f"--data: dataset {key!r} given twice ({explicit[key]} and {rest.strip()})")
            explicit[key] = Path(rest.strip()).expanduser()
            continue
        root = Path(value).expanduser()
        if not root.exists():
            raise DataSourceError(f"--data {value}: no such folder (give a data folder or NAME=PATH)")
        if not root.is_dir():
            raise DataSourceError(f"--data {value}: a file needs its dataset name: NAME={value}")
        roots.append(root)
    return DataArguments(explicit, tuple(roots))


def expected_names(entry: MixtureEntry) -> tuple[str, ...]:
    """The file or folder names a data root is searched for, for one mixture entry (in preference order)."""
    source = entry.source
    if entry.reader == "medmnist":
        return (f"{source}.npz", *(f"{source}_{size}.npz" for size in sorted(MEDMNIST_SIZES, reverse=True)))
    names = [FOLDER_NAMES[entry.reader]]
    if source.lower() != names[0].lower():
        names.append(source)
    return tuple(names)


def _find_in_root(root: Path, entry: MixtureEntry) -> Path | None:
    children: dict[str, Path] = {}
    for child in sorted(root.iterdir()):
        children.setdefault(child.name.lower(), child)
    want_dir = entry.reader != "medmnist"
    for name in expected_names(entry):
        child = children.get(name.lower())
        if child is not None and child.is_dir() == want_dir:
            return child
    return None


# -- resolution -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedDataset:
    """One mixture entry with the path it reads and the reader options to use."""

    entry: MixtureEntry
    path: Path
    options: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return self.entry.dataset

    def read(self, split: str) -> tuple[DatasetInfo, list[LabelledImage]]:
        """Read one split as the entry's task under the entry's name (derived when it differs)."""
        try:
            info, samples = read_dataset(self.entry.reader, self.path, split, **self.options)
        except DatasetError as exc:
            raise DataSourceError(f"dataset {self.name!r} ({self.entry.reader}, {self.path}): {exc}") from exc
        except TypeError as exc:  # an option the reader does not take
            raise DataSourceError(f"dataset {self.name!r}: bad reader options {sorted(self.options)}: {exc}") from exc
        if info.task_type != self.entry.task or info.name != self.entry.dataset:
            try:
                info, samples = derive_task(info, samples, self.entry.task, name=self.entry.dataset)
            except ValueError as exc:
                raise DataSourceError(f"dataset {self.name!r}: {exc}") from exc
        return info, samples


@dataclass
class SpecialtyData:
    """A specialty's resolved datasets (and the ones skipped as missing)."""

    config: SpecialtyConfig
    datasets: list[ResolvedDataset]
    skipped: list[str] = field(default_factory=list)

    def read(self, split: str, limit: int | None = None) -> list[tuple[DatasetInfo, list[LabelledImage]]]:
        """Every dataset's samples of ``split`` (the first ``limit`` of each when given)."""
        if split not in SPLITS:
            raise DataSourceError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        out = []
        for dataset in self.datasets:
            info, samples = dataset.read(split)
            self.config.check_info(info)
            out.append((info, samples[:limit] if limit is not None else samples))
        return out

    def examples(self, split: str, markers: str | None = None, limit: int | None = None) -> list[TaskExample]:
        """Rendered examples of ``split`` over every dataset (``markers``: default the mixture's)."""
        return [ex for _, group in self.examples_by_dataset(split, markers, limit) for ex in group]

    def examples_by_dataset(self, split: str, markers: str | None = None, limit: int | None = None,
                            markers_by_dataset: dict[str, str] | None = None
                            ) -> list[tuple[DatasetInfo, list[TaskExample]]]:
        """``[(info, examples)]`` per dataset, in mixture order.

        ``markers_by_dataset`` overrides the marker style of single datasets (e.g. the styles an
        adapter was trained with).
        """
        style = markers or self.config.option_markers
        out = []
        for info, samples in self.read(split, limit):
            chosen = (markers_by_dataset or {}).get(info.name, style)
            try:
                out.append((info, build_examples(info, samples, chosen)))
            except ValueError as exc:
                raise DataSourceError(f"dataset {info.name!r} ({split}): {exc}") from exc
        return out


def _reader_options(config: SpecialtyConfig, entry: MixtureEntry) -> dict[str, Any]:
    options = dict(entry.options)
    raw = options.get("info")
    if raw is None:
        if entry.reader == "medmnist" and "name" not in options and entry.source.lower() in MEDMNIST_INFOS:
            options["name"] = entry.source.lower()  # a file under any name reads as the entry's set
        return options
    where = f"specialty {config.specialty}: dataset {entry.dataset!r}: options.info"
    if entry.reader != "medmnist":
        raise DataSourceError(f"{where}: only medmnist-format datasets take a custom info")
    if isinstance(raw, DatasetInfo):
        return options
    if not isinstance(raw, dict):
        raise DataSourceError(f"{where}: must be a mapping with class_names")
    unknown = sorted(set(raw) - {"class_names", "description"})
    if unknown:
        raise DataSourceError(f"{where}.{unknown[0]}: unknown field (allowed: class_names, description)")
    names = raw.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise DataSourceError(f"{where}.class_names: must be a non-empty list of names")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise DataSourceError(f"{where}.description: must be a string")
    try:
        options["info"] = DatasetInfo(name=entry.source, task_type=entry.task,
                                      class_names=tuple(str(n) for n in names), specialty=config.specialty,
                                      description=description)
    except ValueError as exc:
        raise DataSourceError(f"{where}: {exc}") from exc
    return options


def resolve_data(config: SpecialtyConfig, data: DataArguments | Sequence[str],
                 allow_missing: bool = False) -> SpecialtyData:
    """Find every dataset of ``config`` from the ``--data`` arguments.

    Parameters
    ----------
    config:
        The specialty mixture.
    data:
        Parsed (:func:`parse_data_args`) or raw ``--data`` values.
    allow_missing:
        Skip datasets found nowhere, with a warning, instead of failing.

    Raises
    ------
    DataSourceError
        If a ``NAME=PATH`` names no dataset of the mixture or a path that does not exist, or if
        datasets are missing (the message lists each one with the names looked for); with
        ``allow_missing``, only if none at all is found.
    """
    args = data if isinstance(data, DataArguments) else parse_data_args(data)
    known = {e.dataset.lower() for e in config.datasets} | {e.source.lower() for e in config.datasets}
    for name, path in args.explicit.items():
        if name not in known:
            raise DataSourceError(f"--data {name}={path}: specialty {config.specialty} has no dataset {name!r} "
                                  f"(its datasets: {', '.join(sorted(known))})")
        if not path.exists():
            raise DataSourceError(f"--data {name}={path}: {path} does not exist")
    resolved: list[ResolvedDataset] = []
    missing: list[str] = []
    for entry in config.datasets:
        path = args.explicit.get(entry.dataset.lower()) or args.explicit.get(entry.source.lower())
        for root in args.roots:
            if path is not None:
                break
            path = _find_in_root(root, entry)
        if path is None:
            names = " or ".join(expected_names(entry))
            where = ", ".join(str(r) for r in args.roots) or "no data folder given"
            missing.append(f"{entry.dataset} ({entry.reader}): {names} in {where}, "
                           f"or --data {entry.source}=PATH")
            continue
        resolved.append(ResolvedDataset(entry, path, _reader_options(config, entry)))
        logger.info("%s: dataset %s from %s", config.specialty, entry.dataset, path)
    if missing and (not allow_missing or not resolved):
        listing = "\n  ".join(missing)
        hint = "" if allow_missing else " (or --allow-missing to skip them)"
        raise DataSourceError(f"specialty {config.specialty}: {len(missing)} of {len(config.datasets)} dataset(s) "
                              f"not found; expected:\n  {listing}\n"
                              f"Pass the data folder or NAME=PATH with --data{hint}.")
    for line in missing:
        logger.warning("specialty %s: skipping missing dataset %s", config.specialty, line)
    return SpecialtyData(config, resolved, [m.split(" ", 1)[0] for m in missing])


__all__ = [
    "DataArguments",
    "DataSourceError",
    "FOLDER_NAMES",
    "ResolvedDataset",
    "SpecialtyData",
    "expected_names",
    "parse_data_args",
    "resolve_data",
    "resolve_specialty",
]
