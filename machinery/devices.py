"""Devices: which one, autocast's 16-bit format and why, CPU speed-ups, the peak FLOP/s behind MFU,
and memory: a step's estimate, what the device has, the out-of-memory line."""

import contextlib
import resource

import torch

from machinery.cli import UserError
from machinery.memory import keep_freed_memory

# -----------------------------------------------------------------------------
# The device: the one asked for, checked, or the best there is.


def pick_device(requested):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    available["cpu"] = True  # the best there is: the first available, in this order
    if not requested:
        return torch.device(next(name for name, here in available.items() if here))
    try:
        device = torch.device(requested)
    except RuntimeError:  # not a device's name at all
        device = torch.device("meta")
    if device.type not in available:  # meta, xla, ...: not set up here
        raise UserError(
            f"--device {requested!r} is not a device this project runs on: use cuda, cuda:N, mps "
            "or cpu"
        )
    if not available[device.type]:
        raise UserError(
            f"--device {requested}, but PyTorch sees no {device.type.upper()} device here: use "
            "--device cpu, or install a torch build for it"
        )
    return device


# -----------------------------------------------------------------------------
# Number formats. Autocast runs the matmuls in a 16-bit format where the hardware has fast units for
# it and keeps fp32 where precision matters (softmax, norms, the loss); the weights, their gradients
# and the optimizer stay fp32.


def cpu_has_native_bf16(cpuinfo=None):
    """Whether the CPU does bf16 in hardware (x86 AMX or AVX512-BF16, Arm's BF16), by /proc/cpuinfo
    (or `cpuinfo`): else PyTorch emulates it, far slower (a step: 4.4 s in fp32, 245 s in bf16)."""
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
    """(dtype, why) of `--dtype auto`. bf16 keeps fp32's range: no loss scaling; fp16 needs a loss
    scaler, for GPUs without bf16; emulated bf16 is slower than fp32, so such CPUs stay in fp32."""
    if device_type == "cuda" and native_bf16:
        return torch.bfloat16, "the GPU has bf16 tensor cores"
    if device_type == "cuda":
        return torch.float16, "the GPU lacks bf16: fp16 with loss scaling"
    if device_type == "cpu" and native_bf16:
        return torch.bfloat16, "the CPU has native bf16 (AMX or AVX512-BF16)"
    if device_type == "cpu":
        why = "the CPU has no native bf16 (no AMX, no AVX512-BF16): emulated bf16 is slower"
        return torch.float32, why
    return torch.float32, f"{device_type}: autocast to a 16-bit type is not set up for it here"


def pick_autocast_dtype(requested, device):
    """(dtype, reason): `--dtype` as given, or auto_dtype() for this device."""
    if requested != "auto":
        return getattr(torch, requested), "as --dtype asks"
    if device.type == "cuda":
        return auto_dtype("cuda", torch.cuda.is_bf16_supported())
    return auto_dtype(device.type, device.type == "cpu" and cpu_has_native_bf16())


def speed_up_cpu(device):
    """Speed-ups on a CPU that change no result a run depends on."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny floats as zero: x86 is slow on them (17% per step)
        keep_freed_memory(every_size=True)  # the step's large buffers are not zeroed again


# -----------------------------------------------------------------------------
# Throughput: model FLOPs utilisation (MFU) is the fraction of the device's peak that the model's
# own arithmetic uses: 6 FLOPs per parameter per token (forward + backward), plus attention's score
# matmuls.

PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}  # dense bf16, SXM


def flops_per_token(config, seq_len, num_params):
    non_embedding = num_params - config.block_size * config.n_embd  # the position table: no matmul
    return 6 * non_embedding + 12 * config.n_layer * config.n_embd * seq_len


def step_flops_of_peak(model, args, device, world_size):
    """A step's FLOPs over the devices' peak FLOP/s (MFU: this / the step's seconds), or None."""
    peak = args.peak_flops or device_peak_flops(device)
    num_params = sum(p.numel() for p in model.parameters())
    flops = flops_per_token(model.config, args.seq_len, num_params) * args.total_batch_size
    return flops / (peak * world_size) if peak else None


def device_peak_flops(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


def peak_memory_gib(device):
    """The most memory the run has held on a GPU so far, in GiB (None elsewhere)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# -----------------------------------------------------------------------------
# Memory. An eager step holds the weights, their gradients and AdamW's two moments (4 fp32 numbers
# per parameter), and per token of a micro-batch its activations (about 16 numbers per channel per
# layer) and its logits with their softmax and gradients (about 8 copies of 4 bytes). An evaluation
# keeps the weights and up to 6 copies of the logits (at 4, a 5 GiB address space failed one in
# two). Fitted to the max RSS of eager fp32 and bf16 CPU runs, within 15%; compiled runs need less.
# --shard optimizer keeps 1/ranks of the moments per rank; --activation_checkpointing keeps a
# block's input (1 number per channel) and one block's activations at a time.


def training_bytes(config, num_params, batch_size, seq_len, shard="none", ranks=1,
                   recompute=False):  # fmt: skip
    """A step's peak bytes per process; recompute: --activation_checkpointing."""
    kept = (config.n_layer + 16 if recompute else 16 * config.n_layer) * config.n_embd
    per_token = 8 * config.vocab_size * 4 + kept * 4
    if shard == "full":  # 1/ranks of it all, and the root and two blocks gathered whole at a time
        block = 12 * config.n_embd**2 + 13 * config.n_embd
        gathered = num_params - (config.n_layer - 2) * block
        state = 16 * num_params // ranks + 8 * gathered  # their weights and gradients
    else:  # weights, gradients; AdamW's moments
        state = 8 * num_params + 8 * num_params // (ranks if shard == "optimizer" else 1)
    return state + batch_size * seq_len * per_token


def available_bytes(device):
    """Memory the run may still take: free GPU memory plus what it holds there; on a CPU the
    system's available memory, within the address-space limit and the cgroup's limit (Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    limits = []
    meminfo = read_words("/proc/meminfo")
    if "MemAvailable:" in meminfo:
        limits.append(int(meminfo[meminfo.index("MemAvailable:") + 1]) * 1024)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and (statm := read_words("/proc/self/statm")):
        limits.append(soft - int(statm[0]) * resource.getpagesize())
    # cgroup v2: a container's own limit ("max": none)
    cgroup_max, cgroup_now = (read_words(f"/sys/fs/cgroup/memory.{n}") for n in ("max", "current"))
    if cgroup_max and cgroup_max[0].isdigit() and cgroup_now:
        limits.append(int(cgroup_max[0]) - int(cgroup_now[0]))
    return min(limits) if limits else None


def read_words(path):
    """The words of a small system file, or [] where it does not exist (not Linux, no cgroup v2)."""
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return []


def evaluation_rows(model, batch_size, seq_len, device, procs):
    """Rows of a val batch per forward pass: --batch_size, or as many as memory holds (at least 1),
    the least over the ranks. The loss is the mean over the same tokens: no number changes."""
    rows, available = batch_size, available_bytes(device)
    if available is not None:
        # 70%: the process grows during an evaluation too (loaders, the allocator's reserves,
        # thread stacks), and an address-space limit counts what is reserved as well as used.
        budget = 0.7 * available - 4 * sum(p.numel() for p in model.parameters())
        rows = max(1, min(batch_size, int(budget // (seq_len * 6 * model.config.vocab_size * 4))))
    return procs.smallest(rows, device)


def check_training_fits(model, args, world_size, device, compiled):
    """The start-up block's memory line. Refuses an eager run that cannot fit, naming the largest
    --batch_size that does, or else what --activation_checkpointing, each further --shard (over
    this group, or 8 GPUs) and the last with recompute would need. Compiled runs: not refused."""
    B, T, total = args.batch_size, args.seq_len, args.total_batch_size
    config, num_params = model.config, sum(p.numel() for p in model.parameters())
    shard, recompute = args.shard, args.activation_checkpointing

    def need(b, shard, ranks, recompute):
        return training_bytes(config, num_params, b, T, shard, ranks, recompute)

    def largest_fit(up_to, shard, ranks, recompute):
        # the largest --batch_size up to `up_to` that divides the step on `ranks` and fits
        fits = (b for b in range(up_to, 0, -1) if total % (b * T * ranks) == 0)
        return next((b for b in fits if need(b, shard, ranks, recompute) <= available), None)

    needed, available = need(B, shard, world_size, recompute), available_bytes(device)
    over = {"optimizer": "AdamW's moments", "full": "weights, gradients and AdamW's moments"}
    said = [f"{over[shard]} over {world_size} ranks"] if shard in over else []
    said += ["activations recomputed"] * recompute
    line = f"~{needed / 2**30:.1f} GiB per process estimated for a step"
    line += f" ({', '.join(said)})" if said else ""
    if available is None:
        return line
    line += f", {available / 2**30:.1f} GiB available on {device}"
    if needed <= available or compiled:
        return line
    if b := largest_fit(B - 1, shard, world_size, recompute):
        advice = (
            f"use --batch_size {b} (--total_batch_size {total} stays: more micro-steps make up the "
            "difference)"
        )
    else:
        ranks, levels = world_size if world_size > 1 else 8, ["none", "optimizer", "full"]
        options = [("--activation_checkpointing", shard, world_size, True)] * (not recompute)
        for level in levels[levels.index(shard) + 1 :]:
            options.append((f"--shard {level} on {ranks} GPUs", level, ranks, recompute))
        if len(options) > 1 and not recompute:
            name, level, on, _ = options[-1]
            options.append((f"{name} with --activation_checkpointing", level, on, True))
        advice = "even --batch_size 1 does not fit"
        for name, level, on, recomputed in options:  # each at its largest --batch_size
            b = largest_fit(B, level, on, recomputed)
            gib = need(b or 1, level, on, recomputed) / 2**30
            verdict = "fits" if b else "would need"
            advice += f"; {name} {verdict} ~{gib:.1f} GiB per process at --batch_size {b or 1}"
        advice += "; else a smaller model (--model, --n_layer, --n_embd) or a shorter --seq_len"
    raise UserError(
        f"the run needs about {needed / 2**30:.1f} GiB per step at --batch_size {B} and {device} "
        f"has {available / 2**30:.1f} GiB available: {advice}"
    )


def lower_batch_size(args):
    return (
        f"lower --batch_size (now {args.batch_size}) and keep --total_batch_size "
        f"{args.total_batch_size}: more micro-steps make up the difference, and the run stays the "
        "same"
    )


@contextlib.contextmanager
def out_of_memory_said(device, advice):
    """Out of memory in the block: one line of the figures and `advice` (what to lower). The
    trainer's is inside torchrun.one_error_line: the rank it happens on says it."""
    try:
        yield
    except RuntimeError as e:  # a CPU's allocator raises a plain RuntimeError
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        figures = ""
        if device.type == "cuda":
            free, total = (n / 2**30 for n in torch.cuda.mem_get_info(device))
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            figures = f" ({peak:.1f} GiB at the peak of {total:.1f} GiB, {free:.1f} GiB free now)"
        raise UserError(f"out of memory on {device}{figures}: {advice}") from None
