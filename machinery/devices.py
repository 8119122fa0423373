"""Devices and number formats: which device a run uses, which 16-bit format autocast computes in and
why, the speed settings that change no result, the peak FLOP/s behind MFU, and memory: what a run is
estimated to need, what the device has, and the out-of-memory message.

Not in train_gpt2.py because a reader of the tutorial needs only the outcome (a device, a dtype, one
autocast context built once), not the probing of /proc/cpuinfo or the table of GPUs behind it.
"""

import argparse
import resource

import torch

from machinery.cli import UserError
from machinery.memory import keep_freed_memory

# -----------------------------------------------------------------------------
# The device: the one asked for, checked, or the best there is.


def pick_device(requested):
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(
                f"--device {requested}, but PyTorch sees no CUDA GPU: "
                f"install a CUDA build of torch or use --device cpu"
            )
        if requested == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps, but MPS is not available: use --device cpu")
        try:
            device = torch.device(requested)
        except RuntimeError:
            device = None
        # meta, xla, ...: not set up here
        if device is None or device.type not in ("cuda", "mps", "cpu"):
            raise UserError(
                f"--device {requested!r} is not a device this "
                f"project runs on: use cuda, cuda:N, mps or cpu"
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# -----------------------------------------------------------------------------
# Number formats. Autocast runs the matmuls in a 16-bit format where the hardware has fast units for
# it and keeps fp32 where precision matters (softmax, norms, the loss); the weights, their gradients
# and the optimizer stay fp32.


def cpu_has_native_bf16(cpuinfo=None):
    """Whether the CPU computes in bf16 in hardware: x86 AMX or AVX512-BF16, Arm's BF16 extension.
    Without it PyTorch emulates bf16, and a training step runs many times slower than in fp32 (a
    4-layer model here: 4.4 s in fp32, 245 s in bf16). `cpuinfo`: the text of /proc/cpuinfo (read
    when None)."""
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
    """The autocast dtype `--dtype auto` picks, and why, as a pure function of the device's type and
    whether it does bf16 in hardware. bf16 keeps fp32's range, so it trains without loss scaling;
    fp16 needs a loss scaler and serves GPUs without bf16; emulated bf16 is slower than fp32, so
    such CPUs stay in fp32."""
    if device_type == "cuda":
        if native_bf16:
            return torch.bfloat16, "the GPU has bf16 tensor cores"
        return torch.float16, "the GPU lacks bf16: fp16 with loss scaling"
    if device_type == "cpu":
        if native_bf16:
            return torch.bfloat16, "the CPU has native bf16 (AMX or AVX512-BF16)"
        return (
            torch.float32,
            "the CPU has no native bf16 (no AMX, no AVX512-BF16): emulated bf16 is slower",
        )
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
    non_embedding = (
        num_params - config.block_size * config.n_embd
    )  # the position table does no matmul
    return 6 * non_embedding + 12 * config.n_layer * config.n_embd * seq_len


def step_flops_of_peak(model, args, device, world_size):
    """The model's FLOPs in one step over the devices' peak FLOP/s (MFU = this / the step's
    seconds), or None where the peak is not known."""
    peak = args.peak_flops or device_peak_flops(device)
    num_params = sum(p.numel() for p in model.parameters())
    flops = flops_per_token(model.config, args.seq_len, num_params) * args.total_batch_size
    return flops / (peak * world_size) if peak else None


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


# -----------------------------------------------------------------------------
# Memory. An eager step holds the weights, their gradients and AdamW's two moments (4 fp32 numbers
# per parameter), and for each token of a micro-batch its activations (about 16 numbers per channel
# per layer, kept for the backward pass) and its logits over the vocabulary with their softmax and
# gradients (about 8 copies of 4 bytes): at small widths the logits are most of it. An evaluation
# keeps the weights and about 4 copies of the logits, nothing for a backward pass. The figures were
# fitted to the peak memory (max RSS) of eager fp32 and bf16 runs on a CPU, within 15%; a compiled
# run needs less. --shard optimizer keeps 1/ranks of the moments on each rank; with
# --activation_checkpointing a block keeps only its input (1 number per channel) until the backward
# pass recomputes it, so one block's activations are held at a time.


def training_bytes(config, num_params, batch_size, seq_len, ranks_sharing=1, recompute=False):
    """A step's peak bytes per process; ranks_sharing: the ranks AdamW's moments are sharded over
    (--shard optimizer), recompute: --activation_checkpointing."""
    kept = (config.n_layer + 16 if recompute else 16 * config.n_layer) * config.n_embd
    per_token = 8 * config.vocab_size * 4 + kept * 4
    state = 8 * num_params + 8 * num_params // ranks_sharing  # weights, grads; moments
    return state + batch_size * seq_len * per_token


def evaluation_bytes(config, num_params, rows, seq_len):
    return 4 * num_params + rows * seq_len * 4 * config.vocab_size * 4


def available_bytes(device):
    """Memory the run may still take: free GPU memory plus what this process holds there; on a CPU,
    the system's available memory, within this process's address-space limit and its cgroup's limit
    (Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    limits = []
    meminfo = read_words("/proc/meminfo")
    if "MemAvailable:" in meminfo:
        limits.append(int(meminfo[meminfo.index("MemAvailable:") + 1]) * 1024)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and read_words("/proc/self/statm"):
        limits.append(soft - int(read_words("/proc/self/statm")[0]) * resource.getpagesize())
    cgroup_max, cgroup_now = (
        read_words("/sys/fs/cgroup/memory.max"),
        read_words("/sys/fs/cgroup/memory.current"),
    )
    # cgroup v2: a container's own limit ("max": none)
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


def evaluation_rows(model, batch_size, seq_len, device):
    """Rows of a val batch per forward pass: all --batch_size of them, or as many as the device has
    memory for (at least one). Splitting a batch changes no number: the loss is the mean over the
    same tokens."""
    available, config = available_bytes(device), model.config
    num_params = sum(p.numel() for p in model.parameters())
    if available is None:
        return batch_size
    # 70% of it: the rest of the process grows during an evaluation too (loaders, the allocator's
    # reserves, thread stacks), and an address-space limit counts what is reserved as well as what
    # is used.
    budget = 0.7 * available - evaluation_bytes(config, num_params, 0, seq_len)
    return max(1, min(batch_size, int(budget // evaluation_bytes(config, 0, 1, seq_len))))


def check_training_fits(model, args, world_size, device, compiled):
    """The estimate of a step's peak memory and what the device has, as the start-up block's line;
    refuses an eager run that cannot fit, naming the largest --batch_size that does, or else what
    --activation_checkpointing and --shard optimizer would need (compiled runs need less: not
    refused)."""
    B, T = args.batch_size, args.seq_len
    config, num_params = model.config, sum(p.numel() for p in model.parameters())
    setting = dict(ranks_sharing=world_size if args.shard == "optimizer" else 1,
                   recompute=args.activation_checkpointing)  # fmt: skip
    needed = training_bytes(config, num_params, B, T, **setting)
    available = available_bytes(device)
    line = f"~{needed / 2**30:.1f} GiB per process estimated for a step"
    said = [f"AdamW's moments over {world_size} ranks"] * (setting["ranks_sharing"] > 1)
    said += ["activations recomputed"] * setting["recompute"]
    line += f" ({', '.join(said)})" if said else ""
    if available is None:
        return line
    line += f", {available / 2**30:.1f} GiB available on {device}"
    if needed <= available or compiled:
        return line
    fits = fitting_batch_sizes(config, num_params, args, world_size, available, **setting)
    if fits:
        advice = (
            f"use --batch_size {fits[0]} (--total_batch_size "
            f"{args.total_batch_size} stays: more micro-steps make up the difference)"
        )
    else:
        advice = "even --batch_size 1 does not fit"
        advice += ways_out(config, num_params, args, world_size, available)
    raise UserError(
        f"the run needs about {needed / 2**30:.1f} GiB per step at --batch_size "
        f"{B} and {device} has {available / 2**30:.1f} GiB available: {advice}"
    )


def fitting_batch_sizes(config, num_params, args, world_size, available, **setting):
    """The --batch_size values below the run's that divide its step and fit, largest first."""
    B, T, total = args.batch_size, args.seq_len, args.total_batch_size
    fits = [b for b in range(B - 1, 0, -1) if total % (b * T * world_size) == 0]
    return [b for b in fits if training_bytes(config, num_params, b, T, **setting) <= available]


def ways_out(config, num_params, args, world_size, available):
    """What --activation_checkpointing, --shard optimizer (over this group, or 8 GPUs under
    torchrun) and both would need, each at the largest --batch_size that then fits (or at 1), as
    the end of the refusal; then a smaller model or context."""
    ranks, sharded = world_size if world_size > 1 else 8, args.shard == "optimizer"
    now = dict(ranks_sharing=world_size if sharded else 1, recompute=args.activation_checkpointing)
    options = []  # (what to pass, on how many ranks, the estimate's setting)
    if not args.activation_checkpointing:
        options.append(("--activation_checkpointing", world_size, dict(now, recompute=True)))
    if not sharded:
        options.append(
            (f"--shard optimizer on {ranks} GPUs", ranks, dict(now, ranks_sharing=ranks))
        )
    if len(options) == 2:
        options.append(("both", ranks, dict(ranks_sharing=ranks, recompute=True)))
    said = []
    for name, on, setting in options:
        run = argparse.Namespace(**dict(vars(args), batch_size=args.batch_size + 1))  # B counts
        fits = fitting_batch_sizes(config, num_params, run, on, available, **setting)
        b = fits[0] if fits else 1
        need = training_bytes(config, num_params, b, args.seq_len, **setting) / 2**30
        verdict = "fits" if fits else "would need"
        said.append(f"{name} {verdict} ~{need:.1f} GiB per process at --batch_size {b}")
    return "".join(f"; {words}" for words in said) + (
        "; else a smaller model (--model, --n_layer, --n_embd) or a shorter --seq_len"
    )


def lower_batch_size(args):
    return (
        f"lower --batch_size (now {args.batch_size}) and keep "
        f"--total_batch_size {args.total_batch_size}: more micro-steps "
        f"make up the difference, and the run stays the same"
    )


def out_of_memory(device, advice):
    """The UserError for a device that ran out of memory: the memory figures, and what to lower."""
    figures = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        peak = torch.cuda.max_memory_allocated(device)
        figures = (
            f" ({peak / 2**30:.1f} GiB at the peak of "
            f"{total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free now)"
        )
    return UserError(f"out of memory on {device}{figures}: {advice}")
