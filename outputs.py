"""What evaluation and -super_resolve write, and under which names: plain files or a BIDS derivatives dataset."""

import json
import os
import pathlib
import re
import urllib.parse
import urllib.request

import checkpoints
import config
import durable
import factors
import scans as scans_lib
import utils
from errors import UserError
from version import PROGRAM_NAME, __version__

BIDS_VERSION = "1.9.0"
METRICS_NAME = "metrics.csv"
# The settings metrics.csv's rows depend on (metrics.MetricsFile).
METRICS_SETTINGS_NAME = "metrics.json"
DESCRIPTION_NAME = "dataset_description.json"
README_NAME = "README.md"
# The page a person opens (report.py), beside metrics.csv.
REPORT_NAME = "report.html"
# What a BIDS validator must not read as data: "**/figures" without its
# trailing slash (bids-validator 3.0.2 does not match "**/figures/").
BIDS_IGNORED = (METRICS_NAME, METRICS_SETTINGS_NAME, REPORT_NAME, "**/figures")

BIDS_ENTITY_ORDER = ("sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc",
                     "stain", "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc",
                     "hemi", "space", "split", "recording", "chunk", "seg", "res", "den", "label", "desc")
_BIDS_RANK = {key: rank for rank, key in enumerate(BIDS_ENTITY_ORDER)}


def bids_stem(entities, **changes):
    """A BIDS file name stem (no suffix) from entities, some replaced or added.

    Args:
        entities: ordered ``(key, value)`` pairs, e.g. ``(("sub", "01"), ("desc", "brain"))``.
        **changes: entities to set, e.g. ``rec="SRx2"``.

    Returns:
        str, e.g. ``"sub-01_rec-SRx2_desc-brain"``, entities in BIDS order.
    """
    merged = dict(entities)
    merged.update(changes)
    ordered = sorted(merged.items(), key=lambda kv: _BIDS_RANK.get(kv[0], _BIDS_RANK["desc"] - 0.5))
    return "_".join(f"{k}-{v}" for k, v in ordered)


def sidecar_path(nifti_path):
    return nifti_path[: -len(utils.nifti_suffix(nifti_path))] + ".json"


class PlainOutputs:
    """The original's output names, all in one folder.

    ``<subject>_sr.nii.gz`` (with a ``<subject>_sr.json`` sidecar: factor,
    mode, checkpoint, options, metrics), ``<subject>_hr.nii.gz``,
    ``<subject>_lr.nii.gz``, ``<subject>_slices.png`` and
    ``<subject>_report.png`` (the figure of report.html).

    Args:
        folder: the -path_volumes.
        upsampling_factor: an int, three ints or a ``factors.UpsamplingFactor``.
    """

    scheme = "plain"
    # The volumes that get a JSON sidecar.
    SIDECAR_KINDS = ("sr",)

    def __init__(self, folder, upsampling_factor):
        self.folder = folder
        # As names show it: 4, or 1x1x4 for one factor per axis.
        self.factor = factors.UpsamplingFactor.of(upsampling_factor).text

    def path(self, subject, kind):
        """str, the NIfTI path of a subject's ``kind`` ("sr", "lr" or "hr") volume."""
        return os.path.join(self.folder, f"{subject.name}_{kind}.nii.gz")

    def slices_path(self, subject):
        """str, the PNG path of a subject's slice mosaic."""
        return os.path.join(self.folder, f"{subject.name}_slices.png")

    def figure_path(self, subject):
        """str, the PNG path of a subject's report figure (``report.py`` embeds it in report.html)."""
        return os.path.join(self.folder, f"{subject.name}_report.png")

    def source(self, scan):
        """str, how a sidecar names the input file (its absolute path)."""
        return os.path.abspath(scan.subject.image_path)

    def start(self, generated_by, scans):
        """Prepares the folder before the first output (nothing to do for plain names)."""

    def metadata_names(self):
        """The names of the files :meth:`start` writes (before any output)."""
        return ()

    def check_unique(self, scans):
        """Refuses inputs that would write the same file.

        Raises:
            UserError: naming both inputs and the file.
        """
        seen = {}
        for scan in scans:
            path = self.path(scan.subject, "sr")
            if path in seen:
                raise UserError(f"{seen[path]} and {scan.subject.image_path} would both be written to "
                                f"{path}; super-resolve them into different -path_volumes")
            seen[path] = scan.subject.image_path

    def write_volume(self, subject, kind, data, affine, header=None, zooms=None, sidecar=None):
        """Writes one volume (and its sidecar when this scheme gives ``kind`` one).

        Args:
            subject: a :class:`layouts.Subject`.
            kind: "sr", "lr" or "hr".
            data: float32 (x, y, z).
            affine: (4, 4) voxel-to-world matrix.
            header: optional nibabel header to copy metadata from.
            zooms: optional (3,) voxel sizes.
            sidecar: optional JSON-serialisable dict.

        Returns:
            str, the NIfTI path.

        Raises:
            durable.OutputError: a file could not be written.
        """
        path = self.path(subject, kind)
        utils.save_nifti(path, data, affine, header, zooms=zooms)
        if sidecar is not None and kind in self.SIDECAR_KINDS:
            durable.write_json(sidecar_path(path), sidecar)
        return path

    def write_slices(self, subject, image):
        """Writes a subject's slice mosaic (uint8 (h, w)); returns its path."""
        path = self.slices_path(subject)
        utils.save_png(path, image)
        return path

    def write_figure(self, subject, png):
        """Writes a subject's report figure (PNG bytes) durably; returns its path."""
        path = self.figure_path(subject)
        durable.write_bytes(path, png)
        return path


class BidsOutputs(PlainOutputs):
    """A BIDS derivatives dataset.

    ``sub-X/[ses-Y/]anat/sub-X[_ses-Y]_rec-SRx<f>_T1w.nii.gz`` (super-resolved),
    ``..._rec-LRx<f>_T1w.nii.gz`` (the degraded input) and
    ``..._desc-reference_T1w.nii.gz`` (the reference), each with a JSON
    sidecar; the other entities of the source file (acq, run, desc...) are
    kept. The mosaic goes to ``sub-X/[ses-Y/]figures/..._rec-SRx<f>_slices.png``
    and the report's figure beside it (``..._report.png``);
    ``dataset_description.json``, ``README.md`` and ``.bidsignore``
    (``BIDS_IGNORED``) at the top. A subject that is not from a BIDS dataset
    becomes ``sub-<its name without non-alphanumerics>``. Every sidecar
    carries ``SkullStripped``, the source's (``scans.skull_stripped``): the
    outputs are not masked here. Source datasets are linked by paths relative
    to the folder (``../..`` for ``<raw>/derivatives/<name>``), a ``file://``
    URI only when there is none (another drive).
    """

    scheme = "bids"
    SIDECAR_KINDS = ("sr", "lr", "hr")

    def __init__(self, folder, upsampling_factor):
        super().__init__(folder, upsampling_factor)
        self.links = {}
        self.scans = {}
        self._stripped = {}

    def skull_stripped(self, subject):
        """bool, the ``SkullStripped`` of a subject's outputs: its source's (computed once)."""
        if subject.name not in self._stripped:
            scan = self.scans.get(subject.name) or scans_lib.InputScan(subject)
            self._stripped[subject.name] = scans_lib.skull_stripped(scan)
        return self._stripped[subject.name]

    def write_volume(self, subject, kind, data, affine, header=None, zooms=None, sidecar=None):
        """:meth:`PlainOutputs.write_volume`, the sidecar with ``SkullStripped`` (required by BIDS)."""
        if sidecar is not None:
            sidecar = {**sidecar, "SkullStripped": self.skull_stripped(subject)}
        return super().write_volume(subject, kind, data, affine, header, zooms=zooms, sidecar=sidecar)

    def _entities(self, subject):
        if subject.entities:
            return subject.entities
        label = re.sub(r"[^A-Za-z0-9]", "", subject.name)
        if not label:
            raise UserError(f"subject {subject.name!r} has no letter or digit to name a BIDS "
                            f"subject with; use -output_layout plain")
        return (("sub", label),)

    def _changes(self, kind):
        return {"sr": {"rec": f"SRx{self.factor}"}, "lr": {"rec": f"LRx{self.factor}"},
                "hr": {"desc": "reference"}}[kind]

    def _subject_folder(self, subject, datatype):
        labels = dict(self._entities(subject))
        parts = [f"sub-{labels['sub']}"] + ([f"ses-{labels['ses']}"] if labels.get("ses") else [])
        return os.path.join(self.folder, *parts, datatype)

    def path(self, subject, kind):
        stem = bids_stem(self._entities(subject), **self._changes(kind))
        return os.path.join(self._subject_folder(subject, "anat"), f"{stem}_T1w.nii.gz")

    def slices_path(self, subject):
        stem = bids_stem(self._entities(subject), **self._changes("sr"))
        return os.path.join(self._subject_folder(subject, "figures"), f"{stem}_slices.png")

    def figure_path(self, subject):
        stem = bids_stem(self._entities(subject), **self._changes("sr"))
        return os.path.join(self._subject_folder(subject, "figures"), f"{stem}_report.png")

    def source(self, scan):
        """str, a BIDS URI ``bids:<link>:<path in the dataset>`` for BIDS inputs, else a file URI."""
        path = os.path.abspath(scan.subject.image_path)
        if not scan.bids:
            return pathlib.Path(path).as_uri()
        key = self._link_key(scan.root)
        return f"bids:{key}:{pathlib.Path(os.path.relpath(path, scan.root)).as_posix()}"

    def portable_link(self, root):
        """How the description names a source folder: a POSIX path relative to this folder.

        ``file://`` URI only when no relative path exists (another drive).
        """
        root = os.path.realpath(root)
        try:
            return pathlib.Path(os.path.relpath(root, os.path.realpath(self.folder))).as_posix()
        except ValueError:
            return pathlib.Path(root).as_uri()

    def link_target(self, value):
        """The absolute folder a DatasetLinks/SourceDatasets value names (None: not a local folder)."""
        parsed = urllib.parse.urlparse(value)
        if parsed.scheme == "file":
            return os.path.realpath(urllib.request.url2pathname(parsed.path))
        if parsed.scheme and len(parsed.scheme) > 1:  # a URL or URI (a one-letter scheme is a drive)
            return None
        return os.path.realpath(os.path.join(os.path.realpath(self.folder), value))

    def _link_key(self, root):
        target = os.path.realpath(root)
        for key, value in self.links.items():
            if self.link_target(value) == target:
                return key
        n = len(self.links) + 1
        key = "raw" if n == 1 else f"raw{n}"
        while key in self.links:
            n += 1
            key = f"raw{n}"
        self.links[key] = self.portable_link(root)
        return key

    def _source_entry(self, url, bids_roots):
        """A SourceDatasets URL made portable: ``bids:<key>:`` for a linked dataset, else a relative path."""
        target = self.link_target(url) if isinstance(url, str) and not url.startswith("bids:") else None
        if target is None:
            return url
        return f"bids:{self._link_key(target)}:" if target in bids_roots else self.portable_link(target)

    def start(self, generated_by, scans):
        """Writes (or extends) ``dataset_description.json`` and ``.bidsignore``.

        Args:
            generated_by: the ``GeneratedBy`` list of this run.
            scans: the :class:`scans.InputScan` list (their datasets become
                ``SourceDatasets`` and ``DatasetLinks``).

        Raises:
            UserError: the folder already describes another dataset (another
                checkpoint or program, or not a derivative).
            durable.OutputError: a file could not be written.
        """
        path = os.path.join(self.folder, DESCRIPTION_NAME)
        existing = config.read_json(path)
        if existing is not None:
            if not isinstance(existing, dict) or existing.get("DatasetType") != "derivative" \
                    or not same_generator(existing.get("GeneratedBy"), generated_by):
                before = existing.get("GeneratedBy") if isinstance(existing, dict) else existing
                raise UserError(f"{path} describes another dataset (GeneratedBy {before}); this run "
                                f"({generated_by[0]['Description']}) would mix its outputs with it. "
                                "Choose another -path_volumes")
            self.links = {k: (self.portable_link(self.link_target(v)) if self.link_target(v) else v)
                          for k, v in existing.get("DatasetLinks", {}).items()}
        self.scans.update((scan.subject.name, scan) for scan in scans)
        bids_roots = {os.path.realpath(s.root) for s in scans if s.bids}
        sources = []
        old = [e for e in (existing.get("SourceDatasets", []) if existing else []) if isinstance(e, dict)]
        for entry in old + [{"URL": s.root} for s in scans if s.root is not None]:
            if "URL" in entry:
                entry = dict(entry, URL=self._source_entry(entry["URL"], bids_roots))
            if entry not in sources:
                sources.append(entry)
        for scan in scans:
            self.source(scan)
        description = {
            "Name": f"{PROGRAM_NAME} super-resolution x{self.factor}",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": generated_by,
            "SourceDatasets": sources,
        }
        if self.links:
            description["DatasetLinks"] = self.links
        if description != existing:
            durable.write_json(path, description)
        self.write_bidsignore()
        readme = os.path.join(self.folder, README_NAME)
        if not os.path.exists(readme):
            durable.write_text(readme, derivatives_readme(self.factor))

    def metadata_names(self):
        return (DESCRIPTION_NAME, README_NAME, ".bidsignore")

    def write_bidsignore(self):
        """Writes ``.bidsignore`` with the ``BIDS_IGNORED`` lines, keeping (and completing) an existing one."""
        path = os.path.join(self.folder, ".bidsignore")
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except FileNotFoundError:
            lines = []
        missing = [line for line in BIDS_IGNORED if line not in lines]
        if missing:
            durable.write_text(path, "".join(f"{line}\n" for line in lines + missing))


def same_generator(recorded, current):
    """bool, whether a folder's ``GeneratedBy`` is this run's: equal, up to the checkpoint digest's length.

    Earlier versions wrote the digest's first 16 hex digits into the
    description; their folders are still resumed (and get the whole digest).
    """
    def shortened(value):
        return re.sub(r"(sha256 [0-9a-f]{%d})[0-9a-f]*" % checkpoints.SHORT_DIGEST, r"\1", json.dumps(value, sort_keys=True))
    return shortened(recorded) == shortened(current)


def derivatives_readme(factor):
    """The README.md of a BIDS derivatives folder: what it holds, for a reader without this program."""
    return f"""# {PROGRAM_NAME} super-resolution x{factor}

Written by {PROGRAM_NAME} {__version__} (3D SRGAN for brain MRI, Sanchez & Vilaplana, MIDL 2018;
see `GeneratedBy` in `dataset_description.json` for the checkpoint).

- `sub-*/[ses-*/]anat/*_rec-SRx{factor}_T1w.nii.gz`: the super-resolved image (x{factor}).
- `*_rec-LRx{factor}_T1w.nii.gz` (evaluation only): the network's input, the reference
  blurred and decimated by {factor}.
- `*_desc-reference_T1w.nii.gz` (evaluation only): the reference the metrics compare with.
- Each image has a JSON sidecar: `Sources` (BIDS URIs into `DatasetLinks`, or file URIs),
  the checkpoint, the options and, for an evaluation, the subject's metrics.
  `SkullStripped` is the source image's, as the outputs are not masked: its sidecar's
  `SkullStripped` when it has one; true for ADNI brain-extracted images
  (`T1_brain_extractedBrainExtractionBrain.nii.gz`) and for an image that is zero outside
  its brain mask file; false otherwise.
- `sub-*/[ses-*/]figures/*_slices.png`: slice mosaics (LR, tricubic, SR, reference);
  `*_report.png`: the figures of `report.html`.
- `metrics.csv`: one row per evaluated subject (PSNR/SSIM of SR and of interpolation);
  `metrics.json`: the settings its rows depend on (a later evaluation resumes only with
  the same ones).
- `report.html`: one page to open in a browser (offline): what was evaluated, the summary
  tables, each subject's metrics and figure, the training run's curves.

`.bidsignore` keeps the figures, the report and the metrics files out of BIDS validation.
"""


def output_scheme(output_layout, scans):
    """"bids" or "plain": -output_layout, where auto means bids when every scan is BIDS."""
    if output_layout != "auto":
        return output_layout
    return "bids" if scans and all(s.bids for s in scans) else "plain"


def held_scheme(folder):
    """The names of the evaluation a folder holds: "bids" (it has a dataset_description.json), "plain", or None.

    None when the folder holds no metrics.csv (no evaluation to resume).
    """
    if not os.path.exists(os.path.join(folder, METRICS_NAME)):
        return None
    return "bids" if os.path.exists(os.path.join(folder, DESCRIPTION_NAME)) else "plain"


def check_resumable_layout(outputs):
    """Refuses to resume an evaluation folder with the other output layout.

    Its metrics.csv says which subjects are done, whatever the names: resumed
    with the other layout, those would be skipped and never written with it.

    Raises:
        UserError: naming both layouts and the flag that resumes the folder.
    """
    held = held_scheme(outputs.folder)
    if held is None or held == outputs.scheme:
        return
    holds = f"{METRICS_NAME} and {DESCRIPTION_NAME}" if held == "bids" else f"{METRICS_NAME}, no {DESCRIPTION_NAME}"
    raise UserError(f"-path_volumes {outputs.folder!r} holds an evaluation with {held} names ({holds}); this run "
                    f"writes {outputs.scheme} names: it would skip the subjects already there and write none of "
                    f"them with {outputs.scheme} names. Resume it with -output_layout {held}, or choose another "
                    "-path_volumes for the other layout (nothing was written)")


def make_outputs(scheme, folder, upsampling_factor):
    """The :class:`PlainOutputs` or :class:`BidsOutputs` writer of ``scheme`` into ``folder``."""
    return (BidsOutputs if scheme == "bids" else PlainOutputs)(folder, upsampling_factor)


def provenance(cfg, checkpoint):
    """The sidecar entries every output of a run shares.

    Args:
        cfg: the run's :class:`config.Settings`.
        checkpoint: ``checkpoints.checkpoint_identity`` of the generator's checkpoint.
    """
    return {
        "UpsamplingFactor": cfg.upsampling_factor.value,
        "UpsamplingMode": cfg.upsampling_mode,
        "SliceProfile": cfg.slice_profile,
        "Checkpoint": checkpoint["path"],
        "CheckpointStep": checkpoint["step"],
        "CheckpointSHA256": checkpoint["sha256"],
        "Blend": cfg.blend,
        "TTA": cfg.tta,
        "SoftwareName": PROGRAM_NAME,
        "SoftwareVersion": __version__,
    }


def generated_by(cfg, checkpoint):
    """The BIDS ``GeneratedBy`` list of a run: the port, its version and the checkpoint."""
    return [{
        "Name": PROGRAM_NAME,
        "Version": __version__,
        "Description": (f"3D SRGAN generator x{cfg.upsampling_factor.text} "
                        f"({cfg.upsampling_mode}), "
                        f"checkpoint {checkpoint['path']} (step {checkpoint['step']}, "
                        f"sha256 {checkpoint['sha256']})"),
    }]
