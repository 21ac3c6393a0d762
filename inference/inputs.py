"""What ``predict.py --input`` segments: image files, nnU-Net channel files and DICOM series, as cases.

:func:`collect_cases` turns the files and folders given into :class:`InputCase` objects, one per
output label map, and a list of problems ``(path, reason)`` for what cannot be a case (the other
cases are still segmented):

* an image file (``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd``; 3D, or 4D with the modalities on
  the 4th axis) is a case named after it;
* nnU-Net channel files of one folder, ``CASE_0000<ext>``, ``CASE_0001<ext>``, ... with exactly the
  task's number of channels, are one case ``CASE`` (a single-modality task's ``CASE_0000<ext>`` too);
* a folder holding one DICOM series is a case named after its SeriesInstanceUID; a folder of such
  folders gives one case per subfolder; a folder holding several series is a problem that lists them;
* any other file named in ``--input`` is a problem (unsupported type; a lone DICOM file: give its
  folder); other files inside a folder are not inputs and are left alone.

Output files (:meth:`InputCase.output_name`) keep the input's format unless an output format is
chosen: NIfTI keeps its suffix (``.nii.gz`` or ``.nii``), MetaImage is written as ``.mha`` (also for
``.mhd`` input), NRRD as ``.nrrd``; DICOM series give NIfTI (``.nii.gz``) unless ``dicom-seg`` is asked
for (``.dcm``, a DICOM Segmentation, DICOM input only).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from utils.decathlon import channel_case
from utils.dicom_series import DicomSeries, describe_series, find_series, looks_like_dicom
from utils.image_io import (
    OUTPUT_SUFFIXES,
    DataError,
    image_format,
    image_suffix,
    is_image_file,
    is_junk_file,
    strip_image_suffix,
    unsupported_file_reason,
)

__all__ = ["OUTPUT_FORMATS", "InputCase", "collect_cases", "output_format_problem"]

#: ``--output_format`` choices
OUTPUT_FORMATS = ("nifti", "mha", "nrrd", "dicom-seg")


@dataclass(frozen=True)
class InputCase:
    """One input to segment into one output.

    Attributes:
        name: the output's base name (case id; the SeriesInstanceUID of a DICOM series).
        source: what :func:`utils.decathlon.read_image` reads: a file, the channel files, or the
            DICOM series' folder.
        kind: ``"file"``, ``"channels"`` or ``"dicom"``.
        input_format: ``"nifti"``, ``"mha"``, ``"mhd"``, ``"nrrd"`` or ``"dicom"``.
        series: the DICOM series (DICOM cases).
    """

    name: str
    source: Path | tuple[Path, ...]
    kind: str
    input_format: str
    series: DicomSeries | None = None

    @property
    def path(self) -> Path:
        """The file (first channel file) or folder, for messages."""
        return self.source[0] if isinstance(self.source, tuple) else self.source

    def output_name(self, output_format: str | None = None) -> str:
        """The output file name: ``name`` + the suffix of ``output_format`` (None: the input's format).

        An image file converted to its own format keeps its exact file name.
        """
        fmt = output_format or ("nifti" if self.input_format == "dicom" else self.input_format)
        if fmt == "dicom-seg":
            return f"{self.name}.dcm"
        own = image_suffix(self.path) if self.kind != "dicom" else None
        if fmt == "nifti" and self.input_format == "nifti" and own is not None:
            suffix = own  # NIfTI stays .nii.gz or .nii
        else:
            suffix = OUTPUT_SUFFIXES[fmt]
        if self.kind == "file" and own == suffix and strip_image_suffix(self.path) == self.name:
            return self.path.name
        return f"{self.name}{suffix}"


def output_format_problem(case: InputCase, output_format: str | None) -> str | None:
    """Why ``case`` cannot be written in ``output_format`` (None: it can)."""
    if output_format == "dicom-seg" and case.kind != "dicom":
        return (
            "--output_format dicom-seg needs DICOM input (a folder holding one DICOM series), this is a "
            f"{image_suffix(case.path) or 'non-DICOM'} file: choose nifti, mha or nrrd"
        )
    return None


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_name(text: str) -> str:
    """A file-name-safe form of a DICOM UID (they are digits and dots already; anything else becomes _)."""
    return _SAFE.sub("_", text).strip("._") or "series"


def _series_cases(folder: Path, problems: list[tuple[Path, str]]) -> list[InputCase]:
    try:
        series = find_series(folder)
    except DataError as e:
        problems.append((folder, e.reason))
        return []
    if len(series) > 1:
        problems.append(
            (
                folder,
                f"the folder holds {len(series)} DICOM series: {describe_series(series)}; give a folder "
                "holding one series (put each series in its own folder)",
            )
        )
        return []
    return [InputCase(_safe_name(s.uid), folder, "dicom", "dicom", s) for s in series]


def _group_channels(files: Sequence[Path], n_channels: int | None) -> list[InputCase]:
    """Image files -> cases: nnU-Net channel files of one case (``CASE_0000`` ... with exactly
    ``n_channels`` channels) become one case, the other files one case each."""
    groups: dict[tuple[Path, str, str], dict[int, Path]] = {}
    for f in files:
        found = channel_case(f)
        if found is not None:
            groups.setdefault((f.parent, found[0], image_suffix(f) or ""), {})[found[1]] = f
    cases: list[InputCase] = []
    used: set[Path] = set()
    for (_, case, _), channels in groups.items():
        if n_channels is None or sorted(channels) != list(range(n_channels)):
            continue
        paths = tuple(channels[c] for c in range(n_channels))
        fmt = image_format(paths[0]) or ""
        source: Path | tuple[Path, ...] = paths if len(paths) > 1 else paths[0]
        cases.append(InputCase(case, source, "channels" if len(paths) > 1 else "file", fmt))
        used.update(paths)
    for f in files:
        if f not in used:
            cases.append(InputCase(strip_image_suffix(f), f, "file", image_format(f) or ""))
    return cases


def _folder(folder: Path, problems: list[tuple[Path, str]]) -> tuple[list[Path], list[InputCase]]:
    """Image files and DICOM cases of a folder (its DICOM files, then its subfolders' series)."""
    entries = sorted(p for p in folder.iterdir() if not is_junk_file(p))
    files = [p for p in entries if p.is_file()]
    images = [p for p in files if is_image_file(p)]
    # other files of a folder (notes, a dataset.json, the data files of .mhd headers) are not inputs;
    # only files named one by one are refused when they are not images
    dicom = any(looks_like_dicom(p) for p in files if p not in images)
    cases = _series_cases(folder, problems) if dicom else []
    for sub in (p for p in entries if p.is_dir()):
        if any(looks_like_dicom(q) for q in sub.iterdir()):
            cases += _series_cases(sub, problems)
    return images, cases


def collect_cases(
    inputs: Sequence[str | os.PathLike[str]],
    n_channels: int | None = None,
    output_format: str | None = None,
) -> tuple[list[InputCase], list[tuple[Path, str]]]:
    """The cases of ``--input`` files and folders (see the module docstring), sorted as found.

    Args:
        inputs: files and/or folders.
        n_channels: the task's number of modalities (groups nnU-Net channel files; None: no grouping).
        output_format: the chosen output format (None: each input's), for the duplicate-name check.

    Returns:
        (cases, problems ``(path, reason)``: missing paths, folders without images, unsupported files,
        folders of several DICOM series, two cases whose outputs would have the same name).
    """
    cases: list[InputCase] = []
    problems: list[tuple[Path, str]] = []
    loose: list[Path] = []  # image files given one by one
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            images, dicom = _folder(p, problems)
            found = _group_channels(images, n_channels) + dicom
            if not found and not any(q == p or q.parent == p for q, _ in problems):
                problems.append(
                    (
                        p,
                        "folder holds no images (.nii.gz, .nii, .mha, .mhd, .nrrd), no DICOM series and no "
                        "folders of DICOM series",
                    )
                )
            cases += found
        elif p.is_file():
            if is_image_file(p):
                loose.append(p)
            elif looks_like_dicom(p):
                problems.append((p, "a single DICOM file: give the folder that holds its series"))
            else:
                problems.append((p, unsupported_file_reason(p)))
        else:
            problems.append((p, "no such file or folder"))
    cases += _group_channels(loose, n_channels)
    seen: dict[str, InputCase] = {}
    unique: list[InputCase] = []
    for case in cases:
        out = case.output_name(output_format)
        if out in seen:
            if seen[out].source != case.source:
                what = "the same DICOM series as" if case.kind == "dicom" else "the same output name as"
                problems.append(
                    (case.path, f"{what} {seen[out].path} (output {out}); outputs would overwrite each other")
                )
            continue
        seen[out] = case
        unique.append(case)
    return unique, problems
