"""The upsampling factor and the low-resolution grid it makes: one integer per axis, the network's
stages, the slice profile, and where each low-resolution voxel lies on the high-resolution grid.

Every room reads a factor through :meth:`UpsamplingFactor.of` (the one place it
is parsed and checked) and asks the value what it needs: the per-axis factors,
the text of names and messages (``"4"``, ``"1x1x3"``), the generator's stages,
the divisibility of a shape, where the LR voxels lie. The settings persist its
:attr:`UpsamplingFactor.value` (an int when isotropic, else three ints), as
earlier versions did.

Slice profiles (the degradation along each upsampled axis, ``-slice_profile``):

- ``gaussian`` (the original's, the default): a Gaussian blur of ``-sigma`` HR
  voxels, then ``x[::f]``: LR voxel ``k`` is a point sample at HR voxel ``f·k``.
- ``box``: LR voxel ``k`` is the mean of HR voxels ``f·k … f·k + f − 1`` (a
  contiguous 2-D acquisition whose slice thickness equals its spacing): it
  lies at its slab's centre, HR voxel ``f·k + (f − 1)/2``.

No TensorFlow and no NumPy here: the command line checks factors before it
loads either.
"""

import dataclasses
import math
import numbers

SLICE_PROFILES = ("gaussian", "box")
AXES = "xyz"
_EXPECTED = ("an integer >= 2 (every axis: 2, 3, 4, 5, 6, ...) or three integers >= 1, one per axis of "
             "the canonical grid with at least one > 1 (thick slices such as 1,1,3 or 1,1,5)")


def _is_int(value):
    # numbers.Integral holds NumPy's integers too; a bool is not a factor.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _numbers(value):
    """The integers of ``value`` (int, three ints, or text like ``"3"``, ``"1,1,3"``, ``"1x1x3"``); () if none."""
    if _is_int(value):
        return (int(value),)
    if isinstance(value, str):
        parts = value.lower().replace("x", ",").replace(" ", "").split(",")
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            return ()
    if isinstance(value, (tuple, list)) and all(_is_int(v) for v in value):
        return tuple(int(v) for v in value)
    return ()


def prime_factors(n):
    """The prime factors of ``n >= 1`` in ascending order, with multiplicity (``12 -> (2, 2, 3)``)."""
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return tuple(out)


def nearest_multiples(n, f):
    """The multiples of ``f`` around ``n`` that are >= ``f``: ``(lower, upper)``, lower None below ``f``."""
    lower = n - n % f
    return (lower if lower >= f else None), lower + f


def check_slice_profile(profile):
    """Returns ``profile`` when it is one of ``SLICE_PROFILES``.

    Raises:
        ValueError: naming the value and the profiles.
    """
    if profile not in SLICE_PROFILES:
        raise ValueError(f"slice_profile {profile!r} must be one of {', '.join(SLICE_PROFILES)}")
    return profile


@dataclasses.dataclass(frozen=True)
class UpsamplingFactor:
    """How many times finer the output is along each axis of the canonical grid.

    Attributes:
        axes: (fx, fy, fz) ints >= 1, at least one > 1.
    """

    axes: tuple

    @classmethod
    def of(cls, value, name="upsampling_factor"):
        """The factor of ``value``: an UpsamplingFactor, an int >= 2, three ints, or their text.

        Args:
            value: ``4``, ``(1, 1, 3)``, ``[1, 1, 3]``, ``"1,1,3"``, ``"1x1x3"`` or an UpsamplingFactor.
            name: what the message calls the value (a flag such as ``-upsampling_factor``).

        Returns:
            UpsamplingFactor.

        Raises:
            ValueError: naming ``name``, the value and what was expected.
        """
        if isinstance(value, cls):
            return value
        numbers = _numbers(value)
        shown = value if isinstance(value, str) else ",".join(map(str, numbers)) or repr(value)
        shown = f"{name} {shown}" if name else shown
        if len(numbers) == 1 and numbers[0] >= 2:
            return cls(numbers * 3)
        if len(numbers) == 3 and min(numbers) >= 1 and max(numbers) >= 2:
            return cls(numbers)
        if len(numbers) == 3 and min(numbers) >= 1:
            raise ValueError(f"{shown} upsamples no axis: expected {_EXPECTED}")
        raise ValueError(f"{shown} must be {_EXPECTED}")

    # What the settings persist and messages show.

    @property
    def isotropic(self):
        """bool, the same factor on every axis (the original's networks and degradation)."""
        return len(set(self.axes)) == 1

    @property
    def value(self):
        """The persisted form: an int when isotropic (``4``), else a tuple of three ints."""
        return self.axes[0] if self.isotropic else tuple(self.axes)

    @property
    def text(self):
        """str for names and messages: ``"4"``, or ``"1x1x3"`` for one factor per axis."""
        return str(self.axes[0]) if self.isotropic else "x".join(map(str, self.axes))

    @property
    def flag_text(self):
        """str as the flag takes it: ``"4"`` or ``"1,1,3"``."""
        return str(self.axes[0]) if self.isotropic else ",".join(map(str, self.axes))

    @property
    def voxels(self):
        """int, the HR voxels per LR voxel (fx·fy·fz)."""
        return self.axes[0] * self.axes[1] * self.axes[2]

    @property
    def common_multiple(self):
        """int, the least common multiple of the axes' factors (what a single margin must divide by)."""
        return math.lcm(*self.axes)

    def __str__(self):
        return self.text

    # The generator.

    def stages(self):
        """The per-axis factors of the generator's upsampling stages, in order.

        One stage per prime factor (with multiplicity) of the least common
        multiple of the axis factors, smallest first; a stage of prime ``p``
        upsamples by ``p`` the axes whose factor still holds a ``p`` (in
        order), the others by 1. Powers of two give the original's ×2 stages
        (``4 -> [(2, 2, 2), (2, 2, 2)]``, ``(1, 1, 4) -> [(1, 1, 2)] * 2``);
        ``6 -> [(2, 2, 2), (3, 3, 3)]``, ``(2, 2, 6) -> [(2, 2, 2), (1, 1, 3)]``,
        ``(1, 2, 3) -> [(1, 2, 1), (1, 1, 3)]``.

        Returns:
            tuple of (sx, sy, sz) int tuples whose per-axis product is :attr:`axes`.
        """
        left, stages = list(self.axes), []
        for p in prime_factors(self.common_multiple):
            strides = tuple(p if n % p == 0 else 1 for n in left)
            left = [n // s for n, s in zip(left, strides)]
            stages.append(strides)
        return tuple(stages)

    # Geometry.

    def indivisible(self, shape):
        """The axes of ``shape`` that are not multiples of their factor.

        Returns:
            list of (axis name, size, factor, (lower, upper) nearest valid sizes).
        """
        return [(AXES[i], n, f, nearest_multiples(n, f))
                for i, (n, f) in enumerate(zip(shape, self.axes)) if n % f]

    def shape_problem(self, flag, shape, factor_flag="-upsampling_factor"):
        """Why ``shape`` does not fit the factor (None when it does), naming ``flag`` and the axes.

        E.g. ``-volume_shape 224,224,152: z = 152 is not divisible by the factor 3; use 150 or 153``.
        """
        bad = self.indivisible(shape)
        if not bad:
            return None
        hint = "; use {} or {}" if len(bad) == 1 else " (use {} or {})"
        parts = [f"{axis} = {n} is not divisible by the factor {f}"
                 + (hint.format(lo, hi) if lo else hint.split(" or")[0].format(hi) + ("" if len(bad) == 1 else ")"))
                 for axis, n, f, (lo, hi) in bad]
        valid = tuple(n if n % f == 0 else (nearest_multiples(n, f)[0] or f)
                      for n, f in zip(shape, self.axes))
        return (f"{flag} {','.join(map(str, shape))}: " + ", ".join(parts)
                + f" (e.g. {flag} {','.join(map(str, valid))} for {factor_flag} {self.flag_text})")

    def margin_problem(self, flag, margin, factor_flag="-upsampling_factor"):
        """Why a patch margin (one size for every axis) does not fit the factor (None when it does)."""
        m = self.common_multiple
        if margin % m == 0:
            return None
        lo, hi = nearest_multiples(margin, m)
        lo = 0 if lo is None else lo
        return (f"{flag} {margin} is not divisible by {m}, the factor of every axis "
                f"({factor_flag} {self.flag_text}); use {lo} or {hi}")

    def lr_origin(self, profile):
        """Where LR voxel 0 lies along each axis, in HR voxels (:func:`lr_origin`)."""
        return lr_origin(self.axes, profile)


def lr_origin(axes, profile):
    """Where LR voxel 0 lies along each axis, in HR voxels: 0 (gaussian), (f − 1)/2 (box).

    LR voxel ``k`` of an axis of factor ``f`` lies at HR voxel ``f·k + origin``.

    Args:
        axes: the factor of each axis, ints >= 1 (1: the axis is not resampled).
        profile: one of ``SLICE_PROFILES``.

    Returns:
        tuple of floats, one per axis.

    Raises:
        ValueError: an unknown profile.
    """
    check_slice_profile(profile)
    return tuple((f - 1) / 2.0 if profile == "box" else 0.0 for f in axes)
