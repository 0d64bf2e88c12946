"""CPU kernels in C, built once per machine with the system C compiler and called via ctypes.

- ``lif.c``: the fused LIF loops. Why C and not ``torch.compile``: as fast, but built in about a
  second instead of 10-40 s, without the compiler stack in the process (~0.1 GB of resident
  memory, counted against every training run), equal in every bit to the eager kernels, and
  able to work in place (``benchmarks/lif_kernels.py``).
- ``pool.c``: max pooling with int32 argmaxes and its gradient, equal to torch's kernels (which
  walk each window with a branch per element and scatter the gradient in a second pass).
- ``spike_conv.c``: convolution of spikes (and spike counts) that adds the weights of the inputs
  that spiked
  instead of multiplying every input, and its weight gradient, which adds output gradients the
  same way (spike-driven inference and training, ``benchmarks/spike_conv.py``).
- ``attention.c``: STAtten's attention of 0/1 spikes, driven by the spikes the same way, reading
  Q, K, V where they lie (spike-driven inference, ``benchmarks/spike_attention.py``).

The library is cached under ``$STATTEN_CACHE`` (default ``~/.cache/statten``; the folder and
the library must belong to the user and be writable by nobody else, or the torch operations are
used with a warning), keyed by the
sources, the compiler and the CPU, so a home directory shared by different machines keeps one
build per CPU type. Without a working C compiler :func:`library` returns None and the callers
fall back to torch operations. Each call is a ``statten::...`` range in ``torch.profiler``
traces.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch.profiler import record_function

__all__ = [
    "available",
    "batch_norm_stats",
    "batch_norm_terms",
    "library",
    "lif_charge",
    "lif_grad",
    "lif_spikes",
    "max_pool2d",
    "max_pool2d_channels_last",
    "max_unpool2d",
    "set_thread_work",
    "small_integer_bytes",
    "spatiotemporal_attention",
    "spike_conv2d",
    "spike_conv2d_weight_grad",
    "spike_mlp",
]

SOURCES = [
    Path(__file__).with_name(name) for name in ("lif.c", "pool.c", "spike_conv.c", "attention.c")
]
HEADERS = [Path(__file__).with_name(name) for name in ("parallel.h", "spike_bits.h")]
FLAGS = ["-O3", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"]
NATIVE_FLAGS = ["-march=native"]  # dropped if the compiler refuses it
LIBRARIES = ["-lm"]
MAX_POOL_KERNEL, MAX_POOL_WIDTH = 8, 1024  # window rows and output row length pool.c takes


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "statten"
    return Path(os.environ.get("STATTEN_CACHE", default))


def _cpu_identity() -> str:
    """The CPU model and features (``-march=native`` builds for this CPU only)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def _compiler() -> str | None:
    found = (shutil.which(name) for name in ("cc", "gcc", "clang"))
    return os.environ.get("CC") or next((path for path in found if path), None)


def _check_private(path: Path) -> None:
    """Refuse (``RuntimeError``) a cache folder or library that another user could have written:
    loading it would run their code in this process."""
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise RuntimeError(
            f"{path} is not private to this user (owner uid {info.st_uid}, mode "
            f"{oct(info.st_mode & 0o777)}); set STATTEN_CACHE to a folder only you can write"
        )


def _build(compiler: str, target: Path) -> None:
    """Compile the sources to ``target`` (atomically: concurrent processes may race to build it),
    in a private temporary folder beside it."""
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        for extra in (NATIVE_FLAGS, []):
            command = [compiler, *FLAGS, *extra, *map(str, SOURCES), *LIBRARIES, "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode == 0:
                built.chmod(0o755)
                os.replace(built, target)
                return
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr.strip()}")


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    f32, i64, i32, ptr = ctypes.c_float, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.statten_lif_spikes.argtypes = [ptr, ptr, i64, i64, f32, f32, ptr, ptr, i64, i64, i32]
    lib.statten_batch_norm_stats.argtypes = [ptr, i64, i64, i64, ptr, ptr, i32]
    lib.statten_lif_charge.argtypes = [
        ptr, ptr, ptr, i64, i64, f32, f32, f32, ptr, ptr, i64, i64, i32
    ]  # fmt: skip
    lib.statten_batch_norm_terms.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64]
    lib.statten_lif_grad.argtypes = [ptr, ptr, ptr, ptr, i64, i64, f32, f32, i32]
    lib.statten_max_pool2d.argtypes = [ptr, i64, i64, i64, ptr, ptr, *[i64] * 8, i32]
    lib.statten_max_pool2d_channels_last.argtypes = [ptr, *[i64] * 4, ptr, *[i64] * 8, i32]
    lib.statten_max_unpool2d.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr, i32]
    lib.statten_spike_conv2d.argtypes = [
        ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, i64, i64, ptr, ptr, ctypes.c_double,
        i64, f32, f32, ptr, i32,
    ]  # fmt: skip
    lib.statten_spike_conv2d_weight_grad.argtypes = [
        ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, i64, i64, ptr, ctypes.c_double, i32
    ]  # fmt: skip
    lib.statten_spike_mlp.argtypes = [
        ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, ctypes.c_double,
        i64, f32, f32, f32, i32,
    ]  # fmt: skip
    lib.statten_set_thread_work.argtypes = [i64]
    lib.statten_small_integer_bytes.argtypes = [ptr, ptr, i64, i32]
    lib.statten_small_integer_bytes.restype = i64
    lib.statten_spatiotemporal_attention.argtypes = [
        ptr, ptr, ptr, ptr, ptr, ptr, *[i64] * 6, f32, i32
    ]  # fmt: skip
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (with a warning) if they cannot be built."""
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        sources = [path.read_text() for path in SOURCES + HEADERS]
        identity = [*sources, compiler, version, *FLAGS, _cpu_identity()]
        key = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
        cache = _cache_dir()
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(cache)
        path = cache / f"kernels-{platform.machine()}-{key}.so"
        if not path.exists():
            _build(compiler, path)
        _check_private(path)
        return _bind(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"statten: the C kernels could not be built ({error}); using torch operations",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def available(x: torch.Tensor) -> bool:
    """True if ``x`` (``[T, n]`` rows) can run the C kernels: contiguous float32 on CPU."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous()
        and library() is not None
    )


def lif_spikes(
    rows: torch.Tensor,
    v_threshold: float,
    tau: float,
    affine: tuple[torch.Tensor, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spikes of a LIF fed ``rows [T, n]`` (see ``lif.c``), or their per-channel ``affine`` map
    (as in :func:`lif_charge`), written into ``out`` if given (which may be ``rows``: each
    element's step is read before its spike is written)."""
    spikes = torch.empty_like(rows) if out is None else out
    steps, n = rows.shape
    with record_function("statten::lif_spikes"):
        library().statten_lif_spikes(
            rows.data_ptr(), spikes.data_ptr(), steps, n, v_threshold, tau,
            *_affine_arguments(affine), torch.get_num_threads(),
        )  # fmt: skip
    return spikes


def _affine_arguments(affine: tuple[torch.Tensor, int] | None) -> tuple:
    """The ``scale, shift, channels, inner`` arguments of the LIF kernels for ``affine``."""
    if affine is None:
        return None, None, 1, 1
    terms, inner = affine
    return terms[0].data_ptr(), terms[1].data_ptr(), terms.shape[1], inner


def batch_norm_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, var_sum)`` per channel of a contiguous float32 ``x [N, C, ...]``, as torch's CPU
    BatchNorm collects them (same order of additions, so the same bits)."""
    images, channels = x.shape[:2]
    stats = torch.empty(2, channels)
    with record_function("statten::batch_norm_stats"):
        library().statten_batch_norm_stats(
            x.data_ptr(), images, channels, x[0, 0].numel(), stats[0].data_ptr(),
            stats[1].data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return stats[0], stats[1]


def lif_charge(
    rows: torch.Tensor,
    out: torch.Tensor,
    v_threshold: float,
    tau: float,
    alpha: float,
    affine: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Fill ``out`` (may be ``rows``) with ``(H - v_th) * alpha``; return the ``H < v_th`` mask.

    With ``affine = (terms, inner)`` the LIF is fed ``terms[0, c] * x + terms[1, c]`` rounded
    once, ``c = (i // inner) % C`` for element ``i`` of a row (``terms [2, C]`` from
    :func:`batch_norm_terms`).
    """
    below = torch.empty(rows.shape, dtype=torch.uint8)
    steps, n = rows.shape
    with record_function("statten::lif_charge"):
        library().statten_lif_charge(
            rows.data_ptr(), out.data_ptr(), below.data_ptr(), steps, n, v_threshold, tau, alpha,
            *_affine_arguments(affine), torch.get_num_threads(),
        )  # fmt: skip
    return below


def batch_norm_terms(
    mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``[scale, shift]`` (``[2, C]``) of a training BatchNorm with these batch statistics, as
    torch's CPU kernel forms them: ``invstd * weight`` and ``bias - mean * scale`` rounded once.
    Contiguous float32 inputs."""
    terms = torch.empty(2, mean.numel())
    library().statten_batch_norm_terms(
        mean.data_ptr(), invstd.data_ptr(), weight.data_ptr(), bias.data_ptr(),
        terms[0].data_ptr(), terms[1].data_ptr(), mean.numel(),
    )  # fmt: skip
    return terms


def lif_grad(
    sig: torch.Tensor, grad_spikes: torch.Tensor, below: torch.Tensor, tau: float, alpha: float
) -> torch.Tensor:
    """Input gradient from the surrogate's sigmoids ``sig`` (overwritten with it, and returned)."""
    steps, n = sig.shape
    with record_function("statten::lif_grad"):
        library().statten_lif_grad(
            sig.data_ptr(), grad_spikes.data_ptr(), below.data_ptr(), sig.data_ptr(), steps, n,
            tau, alpha, torch.get_num_threads(),
        )  # fmt: skip
    return sig


def max_pool2d(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    output_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max pooling of a contiguous ``x [N, C, H, W]`` (dilation 1) and the int32 argmax of every
    window within its plane, equal to ``max_pool2d_with_indices``'s (see ``pool.c``)."""
    n, c, h, w = x.shape
    out = torch.empty(n, c, *output_size)
    indices = torch.empty(n, c, *output_size, dtype=torch.int32)
    with record_function("statten::max_pool2d"):
        library().statten_max_pool2d(
            x.data_ptr(), n * c, h, w, out.data_ptr(), indices.data_ptr(), *output_size,
            *kernel_size, *stride, *padding, torch.get_num_threads(),
        )  # fmt: skip
    return out, indices


def max_pool2d_channels_last(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    output_size: tuple[int, int],
) -> torch.Tensor:
    """Max pooling of a channels-last ``x [N, C, H, W]`` (dilation 1), values only, equal to
    ``max_pool2d``'s (see ``pool.c``); the output is channels-last."""
    n, c, h, w = x.shape
    out = torch.empty(n, c, *output_size, memory_format=torch.channels_last)
    with record_function("statten::max_pool2d_channels_last"):
        library().statten_max_pool2d_channels_last(
            x.data_ptr(), n, h, w, c, out.data_ptr(), *output_size, *kernel_size, *stride,
            *padding, torch.get_num_threads(),
        )  # fmt: skip
    return out


def max_unpool2d(grad_out: torch.Tensor, indices: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """The gradient w.r.t. the input ``[N, C, H, W]`` (``size``, contiguous) of a max pool, from
    the contiguous ``grad_out`` and the int32 ``indices`` of :func:`max_pool2d`: each output's
    gradient added into its argmax, in scatter_add's order."""
    n, c, h, w = size
    grad_x = torch.empty(size)
    with record_function("statten::max_unpool2d"):
        library().statten_max_unpool2d(
            grad_out.data_ptr(), indices.data_ptr(), n * c, h, w, *grad_out.shape[2:],
            grad_x.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return grad_x


def set_thread_work(work: int) -> None:
    """Give each thread of a kernel call at least ``work`` elementary operations (default 2^18,
    about what starting a thread costs): smaller calls run on fewer threads. ``1`` splits every
    call over torch's threads (the tests do, to cover the threaded paths)."""
    library().statten_set_thread_work(work)


def _in_kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x [N, C, H, W]`` as it is if contiguous or channels-last (the layouts the spike
    convolution kernels read and write), else a contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _strides(x: torch.Tensor) -> ctypes.Array:
    """The ``[image, channel, position]`` element strides of ``x`` (in a kernel layout; a
    one-column ``x`` may carry any stride on its last axis)."""
    position = x.stride(3) if x.shape[3] > 1 else x.stride(2)
    return (ctypes.c_int64 * 3)(x.stride(0), x.stride(1), position)


def spike_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
    max_density: float,
    lif: tuple[int, float, float] | None = None,
    pool: tuple[int, int, int] | None = None,
    pool_first: bool = False,
) -> torch.Tensor | None:
    """``conv2d(x, w, bias, stride 1, padding)`` for spikes ``x``, adding the weights of the spikes
    (a spike count, an integer up to 255, as that many spikes).

    ``x [N, C, H, W]`` float32 on CPU, contiguous or channels-last (the output takes its layout),
    ``weight`` laid out ``[kh, kw, C, C_out]`` (contiguous). None when ``x`` holds another value
    than a count or more than ``max_density`` spikes per element: the caller then runs the dense
    convolution.
    With ``lif = (steps, v_threshold, tau)`` (channels-last ``x``, ``N`` a multiple of ``steps``)
    the result is instead the spikes of a LIF fed the output over the ``steps`` time-major
    blocks of ``N``, equal to :func:`lif_spikes` of it, formed while each output is in cache;
    ``pool = (kernel, stride, padding)`` then max-pools them in the kernel too, so that the
    full-size spikes are never written (equal to ``max_pool2d`` of them); with ``pool_first``
    the LIF is fed the max-pooled output instead (equal to :func:`lif_spikes` of
    ``max_pool2d`` of it).
    """
    x = _in_kernel_layout(x)
    n, cin, h, w = x.shape
    kh, kw, _, cout = weight.shape
    if lif is None:
        if pool is not None:
            raise ValueError("a spike convolution pools the spikes of its LIF only")
        layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    elif x.is_contiguous(memory_format=torch.channels_last) and n % lif[0] == 0:
        layout = torch.channels_last
    else:
        raise ValueError("the LIF of a spike convolution needs channels-last time-major images")
    size = [h + 2 * padding - kh + 1, w + 2 * padding - kw + 1]
    if pool is not None:
        kernel, stride, pool_padding = pool
        size = [(side + 2 * pool_padding - kernel) // stride + 1 for side in size]
        if stride < 1 or not 0 <= 2 * pool_padding <= kernel or min(size) < 1:
            raise ValueError(f"not a max pooling of the spike convolution's output: {pool}")
    out = torch.empty((n, cout, *size), memory_format=layout)
    steps, v_threshold, tau = (0, 0.0, 0.0) if lif is None else lif
    with record_function("statten::spike_conv2d"):
        status = library().statten_spike_conv2d(
            x.data_ptr(), _strides(x), n, h, w, cin, weight.data_ptr(),
            None if bias is None else bias.data_ptr(), cout, kh, kw, padding,
            out.data_ptr(), _strides(out), max_density, steps, v_threshold, tau,
            (ctypes.c_int64 * 4)(*(pool or (0, 0, 0)), pool_first), torch.get_num_threads(),
        )  # fmt: skip
    if status < 0:
        raise MemoryError("statten: out of memory in the spike convolution")
    return out if status == 0 else None


def spike_mlp(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor],
    biases: tuple[torch.Tensor | None, torch.Tensor | None],
    max_density: float,
    steps: int,
    v_thresholds: tuple[float, float],
    tau: float,
) -> torch.Tensor | None:
    """The spikes of ``lif2(conv2(lif1(conv1(x))))`` for two pointwise convolutions (``weights``
    laid out ``[C_in, C_hidden]`` and ``[C_hidden, C_out]``, contiguous) and LIFs over the
    ``steps`` time-major blocks of channels-last spikes ``x [N, C_in, H, W]``: the hidden spikes
    are formed and consumed in cache, never written. Equal to :func:`spike_conv2d` with its LIF,
    twice. None when ``x`` is not spike counts or has more than ``max_density`` spikes per
    element."""
    if not x.is_contiguous(memory_format=torch.channels_last) or x.shape[0] % steps:
        raise ValueError("a spike MLP needs channels-last time-major images")
    n, cin, h, w = x.shape
    (hidden_weight, out_weight), (hidden_bias, out_bias) = weights, biases
    out = torch.empty((n, out_weight.shape[1], h, w), memory_format=torch.channels_last)
    with record_function("statten::spike_mlp"):
        status = library().statten_spike_mlp(
            x.data_ptr(), _strides(x), n, h, w, cin, hidden_weight.data_ptr(),
            None if hidden_bias is None else hidden_bias.data_ptr(), hidden_weight.shape[1],
            out_weight.data_ptr(), None if out_bias is None else out_bias.data_ptr(),
            out_weight.shape[1], out.data_ptr(), _strides(out), max_density, steps,
            *v_thresholds, tau, torch.get_num_threads(),
        )  # fmt: skip
    if status < 0:
        raise MemoryError("statten: out of memory in the spike MLP")
    return out if status == 0 else None


def spike_conv2d_weight_grad(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    kernel_size: tuple[int, int],
    padding: int,
    max_density: float,
) -> torch.Tensor | None:
    """The weight gradient of ``conv2d(x, w, stride 1, padding)`` for spikes ``x``, laid out
    ``[kh, kw, C, C_out]``, adding the output gradients at the spikes.

    ``x [N, C, H, W]`` and ``grad_out [N, C_out, OH, OW]`` float32 on CPU, each contiguous or
    channels-last. None when ``x`` holds another value than a spike count or more than
    ``max_density`` spikes per element.
    """
    x, grad_out = _in_kernel_layout(x), _in_kernel_layout(grad_out)
    n, cin, h, w = x.shape
    cout = grad_out.shape[1]
    kh, kw = kernel_size
    grad_weight = torch.zeros(kh, kw, cin, cout)
    with record_function("statten::spike_conv2d_weight_grad"):
        status = library().statten_spike_conv2d_weight_grad(
            x.data_ptr(), _strides(x), n, h, w, cin, grad_out.data_ptr(), _strides(grad_out),
            cout, kh, kw, padding, grad_weight.data_ptr(), max_density, torch.get_num_threads(),
        )  # fmt: skip
    if status < 0:
        raise MemoryError("statten: out of memory in the spike convolution's weight gradient")
    return grad_weight if status == 0 else None


def small_integer_bytes(x: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """``x [N, C, H, W]`` as uint8 of the same layout, and whether it holds only 0 and 1, in one
    pass; None when ``x`` holds a value that is not an integer in [0, 255] (spikes and spike
    counts are). ``x`` float32 on CPU, contiguous or channels-last."""
    x = _in_kernel_layout(x)
    out = torch.empty_like(x, dtype=torch.uint8)
    with record_function("statten::small_integer_bytes"):
        bits_or = library().statten_small_integer_bytes(
            x.data_ptr(), out.data_ptr(), x.numel(), torch.get_num_threads()
        )
    if bits_or == -2:
        raise MemoryError("statten: out of memory converting a tensor to bytes")
    return None if bits_or < 0 else (out, bits_or <= 1)


def spatiotemporal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, scale: float
) -> torch.Tensor | None:
    """STAtten's block-wise attention (``attention.c``) of 0/1 ``q, k, v [T, B, heads, N, d]``:
    float32 on CPU, one set of strides for the three, unit stride on ``d``, ``T`` a multiple of
    ``chunk_size``. The output ``[T, B, heads, N, d]`` is laid out ``[T, B, N, heads, d]`` in
    memory, so that merging its heads into channels is a view. None when q, k or v holds another
    value than 0 and 1."""
    steps, batch, heads, tokens, dim = q.shape
    out = torch.empty(steps, batch, tokens, heads, dim).transpose(2, 3)
    with record_function("statten::spatiotemporal_attention"):
        status = library().statten_spatiotemporal_attention(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), (ctypes.c_int64 * 4)(*q.stride()[:4]),
            out.data_ptr(), (ctypes.c_int64 * 4)(*out.stride()[:4]), steps, batch, heads, tokens,
            dim, chunk_size, scale, torch.get_num_threads(),
        )  # fmt: skip
    if status < 0:
        raise MemoryError("statten: out of memory in the spike attention")
    return out if status == 0 else None
