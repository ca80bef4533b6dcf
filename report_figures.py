"""The figures of report.html: three orthogonal planes of each volume, error maps, a run's curves (matplotlib, PNG).

matplotlib's object API on the Agg canvas: no pyplot, no display, no global
backend switch, so the figures draw the same on a head-less cluster node.
Every function returns PNG bytes (``report.py`` embeds them as data URIs).
"""

import io

import numpy as np

import utils

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


def nearest_planes(lr, upsampling_factor, hr_shape):
    """The :func:`mid_planes` of ``lr`` nearest-upsampled to ``hr_shape``, without upsampling the whole volume.

    Equal to ``mid_planes(utils.upsample_baseline(lr, f, 0, hr_shape))``
    (the same rounding), at the cost of three slices: a -super_resolve
    input can be large.
    """
    factors = utils.per_axis(upsampling_factor, "upsampling_factor")
    lr = np.asarray(lr, dtype=np.float32)
    planes = []
    for axis in range(3):
        def along(value, other):
            return [value if a == axis else other(a) for a in range(3)]
        # Which LR slice the interpolation reads for the HR mid-plane: a ramp tells, with its rounding.
        ramp = np.arange(lr.shape[axis], dtype=np.float32).reshape(along(-1, lambda a: 1))
        read = utils.upsample_baseline(ramp, along(factors[axis], lambda a: 1), 0, along(hr_shape[axis], lambda a: 1))
        slab = np.take(lr, [int(read.ravel()[hr_shape[axis] // 2])], axis=axis)
        upsampled = utils.upsample_baseline(slab, along(1, lambda a: factors[a]), 0,
                                            along(1, lambda a: hr_shape[a]))
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
    figure.savefig(buffer, format="png", dpi=DPI)
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
    Each row of a group is one picture (its planes side by side, a thin gap
    between), which draws several times faster than one axes per panel.

    Args:
        images: list of (title, 3 planes) (:func:`mid_planes`, :func:`nearest_planes`).
        errors: list of (title, 3 planes) of absolute errors, same units as the images.
        zooms: (3,) voxel sizes of the planes' grid, for the pixels' aspect.
        error_label: the error colour bar's label.

    Returns:
        bytes, a PNG.
    """
    groups = [(list(images), "gray", scale_top(images[0][1], WINDOW_PERCENTILE), "intensity")]
    if errors:
        groups.append((list(errors), "magma", scale_top([p for _, planes in errors for p in planes],
                                                        ERROR_PERCENTILE), error_label))
    aspects = plane_aspects(zooms)
    heights = [p.shape[0] * a for p, a in zip(images[0][1], aspects)]
    bar = 0.12  # a colour bar's width, in panels
    ratios = [r for columns, *_ in groups for r in (len(columns), bar, 0.5)][:-1]
    width = PANEL_INCHES * sum(ratios) + 1.3
    figure = new_figure(width, PANEL_INCHES * 3 + 0.45)
    grid = figure.add_gridspec(3, len(ratios), width_ratios=ratios, height_ratios=heights,
                               left=0.45 / width, right=1 - 0.8 / width, top=1 - 0.3 / figure.get_figheight(),
                               bottom=0.02, wspace=0.04, hspace=0.06)
    for g, (columns, cmap, top, label) in enumerate(groups):
        for row in range(3):
            ax = figure.add_subplot(grid[row, 3 * g])
            strip, centres = side_by_side([planes[row] for _, planes in columns])
            shown = ax.imshow(strip, cmap=cmap, vmin=0, vmax=top, aspect=aspects[row], interpolation="nearest")
            ax.set_yticks([])
            ax.set_xticks(centres if row == 0 else [])
            if row == 0:
                ax.set_xticklabels([title for title, _ in columns], fontsize=9)
                ax.xaxis.tick_top()
                ax.tick_params(length=0)
            if g == 0:
                ax.set_ylabel(utils.ROW_LABELS[row])
        figure.colorbar(shown, cax=figure.add_subplot(grid[:, 3 * g + 1]), label=label)
    return png_bytes(figure)


def side_by_side(planes, gap=1):
    """Same-shaped planes in one picture, ``gap`` NaN columns between (drawn blank); and their centres."""
    h, w = planes[0].shape
    strip = np.full((h, len(planes) * (w + gap) - gap), np.nan, dtype=np.float32)
    for i, plane in enumerate(planes):
        strip[:, i * (w + gap): i * (w + gap) + w] = plane
    return strip, [i * (w + gap) + (w - 1) / 2 for i in range(len(planes))]


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
            ax.set_yscale("log")
        ax.set(title=f"{title} losses, mean per epoch", xlabel="epoch")
        ax.legend(fontsize=8)
    if validations:
        validation_axes(axes[-1], validations)
    return png_bytes(figure)


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


def super_resolution_figure(image, sr, upsampling_factor, zooms):
    """A scan's figure: the input nearest-upsampled beside its SR, on one grey scale.

    Args:
        image: float (x, y, z), the input scan.
        sr: float (fx·x, fy·y, fz·z), its super-resolved volume.
        upsampling_factor: the model's factor.
        zooms: (3,) voxel sizes of the SR (mm).

    Returns:
        bytes, a PNG.
    """
    return planes_figure([("input (nearest)", nearest_planes(image, upsampling_factor, sr.shape)),
                          ("SR", mid_planes(sr))], zooms=zooms)
