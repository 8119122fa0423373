"""Devices and number formats: which device a run uses, which 16-bit format autocast computes in and why,
the speed settings that change no result, the peak FLOP/s behind MFU, and the out-of-memory message.

Not in train_gpt2.py because a reader of the tutorial needs only the outcome (a device, a dtype, one
autocast context built once), not the probing of /proc/cpuinfo or the table of GPUs behind it.
"""

import torch

from common import UserError, keep_freed_memory

# -----------------------------------------------------------------------------
# The device: the one asked for, checked, or the best there is.


def pick_device(requested):
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(
                f"--device {requested}, but PyTorch sees no CUDA GPU: install a CUDA build of torch or use --device cpu"
            )
        if requested == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps, but MPS is not available: use --device cpu")
        try:
            return torch.device(requested)
        except RuntimeError:
            raise UserError(
                f"--device {requested!r} is not a device PyTorch knows: use cuda, cuda:N, mps or cpu"
            ) from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# -----------------------------------------------------------------------------
# Number formats. Autocast runs the matmuls in a 16-bit format where the hardware has fast units for it
# and keeps fp32 where precision matters (softmax, norms, the loss); the weights, their gradients and the
# optimizer stay fp32.


def cpu_has_native_bf16(cpuinfo=None):
    """Whether the CPU computes in bf16 in hardware: x86 AMX or AVX512-BF16, Arm's BF16 extension. Without
    it PyTorch emulates bf16, and a training step runs many times slower than in fp32 (a 4-layer model
    here: 4.4 s in fp32, 245 s in bf16). `cpuinfo`: the text of /proc/cpuinfo (read when None)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:  # not Linux: no way to tell, so no bf16
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):  # x86, Arm
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def auto_dtype(device_type, native_bf16):
    """The autocast dtype `--dtype auto` picks, and why, as a pure function of the device's type and whether
    it does bf16 in hardware. bf16 keeps fp32's range, so it trains without loss scaling; fp16 needs a
    loss scaler and serves GPUs without bf16; emulated bf16 is slower than fp32, so such CPUs stay in fp32."""
    if device_type == "cuda":
        if native_bf16:
            return torch.bfloat16, "the GPU has bf16 tensor cores"
        return torch.float16, "the GPU lacks bf16: fp16 with loss scaling"
    if device_type == "cpu":
        if native_bf16:
            return torch.bfloat16, "the CPU has native bf16 (AMX or AVX512-BF16)"
        return torch.float32, "the CPU has no native bf16 (no AMX, no AVX512-BF16): emulated bf16 is slower"
    return torch.float32, f"{device_type}: autocast to a 16-bit type is not set up for it here"


def pick_autocast_dtype(requested, device):
    """(dtype, reason): `--dtype` as given, or auto_dtype() for this device."""
    if requested != "auto":
        return getattr(torch, requested), "as --dtype asks"
    if device.type == "cuda":
        return auto_dtype("cuda", torch.cuda.is_bf16_supported())
    return auto_dtype(device.type, device.type == "cpu" and cpu_has_native_bf16())


def autocast_context(device, dtype):
    """The mixed-precision context, built once and entered as `with autocast:` (no-op for fp32)."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def use_fast_math(device):
    """Speed-ups that change no result a run depends on."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that autocast leaves
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny floats as zero: x86 handles them slowly (17% per step here)
        keep_freed_memory(every_size=True)  # the step's large buffers are not zeroed again by the kernel


# -----------------------------------------------------------------------------
# Throughput: model FLOPs utilisation (MFU) is the fraction of the device's peak that the model's own
# arithmetic uses: 6 FLOPs per parameter per token (forward + backward), plus attention's score matmuls.

PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}  # dense bf16, SXM


def flops_per_token(config, seq_len, num_params):
    non_embedding = num_params - config.block_size * config.n_embd  # the position table does no matmul
    return 6 * non_embedding + 12 * config.n_layer * config.n_embd * seq_len


def device_peak_flops(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for gpu, flops in PEAK_BF16_FLOPS.items():
            if gpu in name:
                return flops
    return None


def peak_memory_gib(device):
    """The most memory the run has held on a GPU so far, in GiB (None elsewhere)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def out_of_memory(device, advice):
    """The UserError for a device that ran out of memory: the memory figures, and what to lower."""
    figures = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        peak = torch.cuda.max_memory_allocated(device)
        figures = f" ({peak / 2**30:.1f} GiB at the peak of {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free now)"
    return UserError(f"out of memory on {device}{figures}: {advice}")
