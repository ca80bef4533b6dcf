"""The figures of report.html: three orthogonal planes of each volume, error maps, a run's curves (matplotlib, PNG).

matplotlib's object API on the Agg canvas: no pyplot, no display, no global
backend switch, so the figures draw the same on a head-less cluster node.
Every function returns PNG bytes (``report.py`` embeds them as data URIs).
"""

import io

import numpy as np

import utils
from factors import UpsamplingFactor

# Inches per panel and dots per inch: 224x224 slices come out at ~170 pixels.
PANEL_INCHES = 1.9
DPI = 90
# The grey window's top and the error scale's top: percentiles, so that one
# bright voxel does not darken the rest.
WINDOW_PERCENTILE = 99.5
ERROR_PERCENTILE = 99.5


def mid_planes(volume):
    """The sagittal, coronal and axial mid-slices of a volume (x, y, z), as viewers show them.

    Returns:
        list of 3 float32 arrays; rot90 puts the second axis of each plane up,
        as ``utils.slices_mosaic`` does.
    """
    v = np.asarray(volume, dtype=np.float32)
    cx, cy, cz = (n // 2 for n in v.shape)
    return [np.rot90(v[cx, :, :]), np.rot90(v[:, cy, :]), np.rot90(v[:, :, cz])]


def nearest_planes(lr, upsampling_factor, hr_shape, slice_profile="gaussian"):
    """The :func:`mid_planes` of ``lr`` nearest-upsampled to ``hr_shape``, without upsampling the whole volume.

    Equal to ``mid_planes(utils.upsample_baseline(lr, f, 0, hr_shape, slice_profile))``
    (the same rounding, the LR voxels where the profile puts them), at the
    cost of three slices: a -super_resolve input can be large.
    """
    factors = UpsamplingFactor.of(upsampling_factor).axes
    lr = np.asarray(lr, dtype=np.float32)
    planes = []
    for axis in range(3):
        def along(value, other):
            return [value if a == axis else other(a) for a in range(3)]
        # Which LR slice the interpolation reads for the HR mid-plane: a ramp tells, with its rounding.
        ramp = np.arange(lr.shape[axis], dtype=np.float32).reshape(along(-1, lambda a: 1))
        read = utils.upsample_baseline(ramp, along(factors[axis], lambda a: 1), 0, along(hr_shape[axis], lambda a: 1),
                                       slice_profile)
        slab = np.take(lr, [int(read.ravel()[hr_shape[axis] // 2])], axis=axis)
        upsampled = utils.upsample_baseline(slab, along(1, lambda a: factors[a]), 0,
                                            along(1, lambda a: hr_shape[a]), slice_profile)
        planes.append(np.rot90(np.take(upsampled, 0, axis=axis)))
    return planes


def plane_aspects(zooms):
    """The pixel aspect (height / width) of each mid-plane for voxel sizes ``zooms`` (mm)."""
    zx, zy, zz = (float(z) for z in zooms)
    return [zz / zy, zz / zx, zy / zx]


def png_bytes(figure):
    """The PNG of a matplotlib figure drawn on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    # zlib level 3: a fifth of the default's time for a few per cent more bytes.
    figure.savefig(buffer, format="png", dpi=DPI, pil_kwargs={"compress_level": 3})
    return buffer.getvalue()


def new_figure(width, height):
    """A matplotlib Figure of ``width`` x ``height`` inches (no pyplot; laid out by hand, which is
    ~2x faster than matplotlib's constrained layout)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def scale_top(planes, percentile):
    """The top of a colour scale: the percentile of the planes' non-zero values (1 when all are 0)."""
    values = np.concatenate([p[p > 0].ravel() for p in planes] or [np.zeros(0)])
    top = float(np.percentile(values, percentile)) if values.size else 0.0
    return top if top > 0 else 1.0


def planes_figure(images, errors=(), zooms=(1.0, 1.0, 1.0), error_label="|error|"):
    """Three orthogonal planes of several volumes side by side, and error maps on one colour scale.

    Rows are the sagittal, coronal and axial mid-planes; columns the
    ``images`` (one grey scale: 0 to the 99.5th percentile of the first,
    the reference) then the ``errors`` (one shared colour scale, 0 to the
    99.5th percentile of all of them), each group followed by its colour bar.
    Each group is coloured here and drawn as one picture (panels with thin
    white gaps, voxels resampled to their physical aspect): one axes per
    group instead of one per panel draws in a fraction of the time.

    Args:
        images: list of (title, 3 planes) (:func:`mid_planes`, :func:`nearest_planes`).
        errors: list of (title, 3 planes) of absolute errors, same units as the images.
        zooms: (3,) voxel sizes of the planes' grid, for the pixels' aspect.
        error_label: the error colour bar's label.

    Returns:
        bytes, a PNG.
    """
    from matplotlib import cm, colormaps, colors

    groups = [(list(images), "gray", scale_top(images[0][1], WINDOW_PERCENTILE), "intensity")]
    if errors:
        groups.append((list(errors), "magma", scale_top([p for _, planes in errors for p in planes],
                                                        ERROR_PERCENTILE), error_label))
    aspects = plane_aspects(zooms)
    pictures = [group_picture(columns, colormaps[cmap], top, aspects) for columns, cmap, top, _ in groups]
    height = pictures[0][0].shape[0]
    widths = [r for picture, *_ in pictures for r in (picture.shape[1], 0.04 * height, 0.2 * height)][:-1]
    inches = PANEL_INCHES * 3 / height  # per picture pixel
    width = inches * sum(widths) + 1.6
    figure = new_figure(width, inches * height + 0.35)
    grid = figure.add_gridspec(1, len(widths), width_ratios=widths, left=0.5 / width, right=1 - 0.85 / width,
                               top=1 - 0.3 / figure.get_figheight(), bottom=0.02, wspace=0.03)
    for g, ((columns, cmap, top, label), (picture, centres, middles)) in enumerate(zip(groups, pictures)):
        ax = figure.add_subplot(grid[0, 3 * g])
        ax.imshow(picture, interpolation="nearest", aspect="equal")
        ax.set_axis_off()
        for (title, _), x in zip(columns, centres):
            ax.text(x, -2, title, ha="center", va="bottom", fontsize=9)
        if g == 0:
            for label_text, y in zip(utils.ROW_LABELS, middles):
                ax.text(-3, y, label_text, ha="right", va="center", rotation=90, fontsize=10)
        scale = cm.ScalarMappable(colors.Normalize(0, top), colormaps[cmap])
        figure.colorbar(scale, cax=figure.add_subplot(grid[0, 3 * g + 1]), label=label)
    return png_bytes(figure)


def group_picture(columns, cmap, top, aspects, gap=2):
    """One group of :func:`planes_figure` as an RGB picture, and where its columns and rows are.

    Returns:
        (uint8 (h, w, 3) picture, x centre of each column, y middle of each row), in its pixels.
    """
    rows = [[square_pixels(planes[r], aspects[r]) for _, planes in columns] for r in range(3)]
    w = max(p.shape[1] for row in rows for p in row)
    picture_rows, middles, y = [], [], 0
    for row in rows:
        h = row[0].shape[0]
        strip = np.full((h + gap, len(row) * (w + gap), 3), 255, np.uint8)
        for i, plane in enumerate(row):
            rgb = cmap(np.clip(plane / top, 0, 1), bytes=True)[..., :3]
            strip[:h, i * (w + gap): i * (w + gap) + plane.shape[1]] = rgb
        picture_rows.append(strip)
        middles.append(y + h / 2)
        y += h + gap
    picture = np.concatenate(picture_rows)[:-gap, :-gap]
    return picture, [i * (w + gap) + w / 2 for i in range(len(columns))], middles


def square_pixels(plane, aspect):
    """A plane resampled (nearest) along its rows so that a pixel of height / width ``aspect`` becomes square."""
    if abs(aspect - 1) < 1e-3:
        return plane
    rows = max(1, int(round(plane.shape[0] * aspect)))
    return plane[np.minimum((np.arange(rows) + 0.5) / aspect, plane.shape[0] - 1).astype(int)]


def curves_figure(losses, validations):
    """A training run's curves: the mean losses per epoch, and the validation PSNR per step, best marked.

    Args:
        losses: rows of ``losses.csv`` as dicts of floats (``run_records.read_numbers``).
        validations: rows of ``validation.csv`` as dicts of floats.

    Returns:
        bytes, a PNG; None when both are empty.
    """
    panels = ([("generator", ("g_loss", "mse", "gdl")), ("discriminator", ("d_loss", "adv"))] if losses else [])
    if not panels and not validations:
        return None
    figure = new_figure(4.2 * (len(panels) + bool(validations)), 3.0)
    axes = list(figure.subplots(1, len(panels) + bool(validations), squeeze=False)[0])
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.9, wspace=0.3)
    for ax, (title, keys) in zip(axes, panels):
        epochs = [r["epoch"] for r in losses]
        for key in keys:
            values = [r.get(key, np.nan) for r in losses]
            ax.plot(epochs, values, marker="o", markersize=3, label=key)
        if all(r.get(k, 0) > 0 for r in losses for k in keys):
            log_scale(ax)
        ax.set(title=f"{title} losses, mean per epoch", xlabel="epoch")
        ax.legend(fontsize=8)
    if validations:
        validation_axes(axes[-1], validations)
    return png_bytes(figure)


def log_scale(ax):
    """A log y axis labelled in plain numbers (the default's mathtext labels draw several times slower)."""
    from matplotlib.ticker import FuncFormatter

    def label(value, minor):
        leading = round(value / 10 ** np.floor(np.log10(value))) if value > 0 else 0
        return f"{value:g}" if not minor or leading in (2, 5) else ""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: label(value, False)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: label(value, True)))


def validation_axes(ax, validations):
    """The validation panel: fair PSNR per validated step, tricubic's as the reference line, the best starred."""
    steps = [r["step"] for r in validations]
    ax.plot(steps, [r.get("psnr_fair", np.nan) for r in validations], marker="o", markersize=3, label="SR")
    if any(np.isfinite(r.get("psnr_tricubic_fair", np.nan)) for r in validations):
        ax.plot(steps, [r.get("psnr_tricubic_fair", np.nan) for r in validations], linestyle="--",
                color="grey", label="tricubic")
    scored = [r for r in validations if np.isfinite(r.get("psnr_fair", np.nan))]
    if scored:
        best = max(scored, key=lambda r: r["psnr_fair"])
        ax.plot([best["step"]], [best["psnr_fair"]], marker="*", markersize=14, color="tab:red",
                linestyle="none", label=f"best: step {best['step']:.0f}")
    ax.set(title="validation PSNR (fair)", xlabel="step", ylabel="dB")
    ax.legend(fontsize=8)


def evaluation_figure(hr, lr_nearest, tricubic, sr, mask, zooms):
    """A subject's figure: HR, LR (nearest), tricubic, SR, then |tricubic - HR| and |SR - HR| inside the mask.

    Args:
        hr, lr_nearest, tricubic, sr: float (x, y, z) volumes on the canonical grid, source intensities.
        mask: bool (x, y, z), the brain mask the metrics are computed in.
        zooms: (3,) voxel sizes (mm).

    Returns:
        bytes, a PNG.
    """
    def error(estimate):
        return mid_planes(np.abs(np.asarray(estimate, np.float32) - hr) * mask)
    return planes_figure([("HR", mid_planes(hr)), ("LR (nearest)", mid_planes(lr_nearest)),
                          ("tricubic", mid_planes(tricubic)), ("SR", mid_planes(sr))],
                         [("|tricubic − HR|", error(tricubic)), ("|SR − HR|", error(sr))], zooms,
                         error_label="|error| inside the mask")


def super_resolution_figure(image, sr, upsampling_factor, zooms, slice_profile="gaussian"):
    """A scan's figure: the input nearest-upsampled beside its SR, on one grey scale.

    Args:
        image: float (x, y, z), the input scan.
        sr: float (fx·x, fy·y, fz·z), its super-resolved volume.
        upsampling_factor: the model's factor.
        zooms: (3,) voxel sizes of the SR (mm).
        slice_profile: the model's, where the input's voxels lie on the SR grid.

    Returns:
        bytes, a PNG.
    """
    return planes_figure([("input (nearest)", nearest_planes(image, upsampling_factor, sr.shape, slice_profile)),
                          ("SR", mid_planes(sr))], zooms=zooms)
