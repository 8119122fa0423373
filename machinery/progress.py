"""What a run prints and logs (torch-free): the start-up block, each step's line, the last block
with the commands to run next, and log.txt. The loop computes the numbers, this makes the lines."""

import contextlib
import os
import shlex
import time

from machinery import flags
from machinery.cli import UserError
from machinery.files import in_folder


class RunLog:
    """log.txt, one `{step} {kind} {value}` line per measurement, written by rank 0 alone. A resume
    appends, after dropping a last line cut short by a kill; a new run writes it anew. A line that
    cannot be written whole (a full disk) is taken back: the file never ends in a torn line."""

    def __init__(self, log_dir, resume, master):
        self.fd = None
        if not master:
            return
        path = os.path.join(log_dir, "log.txt")
        if os.path.islink(path):
            raise UserError(
                f"{path} is a symbolic link (to {os.readlink(path)}): the run would write through "
                "it; remove the link, or pass another --log_dir"
            )
        if resume:
            with contextlib.suppress(FileNotFoundError), open(path, "rb+") as f:
                text = f.read()
                if text and not text.endswith(b"\n"):
                    f.truncate(text.rfind(b"\n") + 1)
        elif os.path.isfile(path) and os.path.getsize(path):
            print(
                f"note: {path} of an earlier run that saved no checkpoint is replaced", flush=True
            )
        mode = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if resume else os.O_TRUNC)
        self.path, self.fd = path, os.open(path, mode, 0o644)

    def write(self, line):
        if self.fd is None:
            return
        end = os.lseek(self.fd, 0, os.SEEK_END)
        data = (line + "\n").encode()
        try:
            if os.write(self.fd, data) != len(data):
                raise OSError(28, "No space left on device", self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, end)  # no torn line
            e.filename = e.filename or self.path
            raise

    def close(self):
        if self.fd is not None:
            os.close(self.fd)


class Progress:
    """Where the run is, for each step's line (time elapsed and left) and for the last block."""

    def __init__(self, first_step, last_step):
        self.first_step, self.last_step = first_step, last_step
        self.started = self.last_step_end = time.monotonic()
        self.seconds_per_step = None  # smoothed over recent steps, evaluations and checkpoints
        self.train_loss = self.val_loss = self.val_step = None
        self.best_val_loss = self.best_val_step = None
        self.hellaswag = self.checkpoint = self.start_val_loss = None

    def label(self, step):
        if step < 0:  # the evaluation of the starting weights
            return "before step 0"
        return f"step {step:{len(str(self.last_step))}d}/{self.last_step}"

    def step_done(self, step):
        """(seconds since the start, estimated seconds left, None until there is an estimate)."""
        now = time.monotonic()
        interval, self.last_step_end = now - self.last_step_end, now
        # the first step compiles and warms up: it says nothing of the others
        if step > self.first_step:
            before = self.seconds_per_step
            self.seconds_per_step = interval if before is None else 0.9 * before + 0.1 * interval
        per_step = self.seconds_per_step
        return now - self.started, None if per_step is None else per_step * (self.last_step - step)

    def val_done(self, step, val_loss):
        self.val_loss, self.val_step = val_loss, step
        if step < 0:
            self.start_val_loss = val_loss
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.best_val_step = val_loss, step


def step_line(progress, step, train_loss, lr, norm, dt, args, mfu_flops=None, memory_gib=None):
    """The step's line; mfu_flops: its FLOPs over the devices' peak FLOP/s (None: unknown)."""
    progress.train_loss = train_loss
    elapsed, left = progress.step_done(step)
    speed = f"{1000 * dt:.0f} ms | {args.total_batch_size / dt:,.0f} tok/s"
    if mfu_flops:
        speed += f" | mfu {100 * (mfu_flops / dt):.1f}%"
    if memory_gib is not None:
        speed += f" | mem {memory_gib:.1f} GiB"
    numbers = f"loss {train_loss:.6f} | lr {lr:.4e} | norm {norm:.4f}"
    clock = f"{format_seconds(elapsed)} elapsed, {format_seconds(left)} left"
    return f"{progress.label(step)} | {numbers} | {speed} | {clock}"


def since(started):
    """The seconds since time.time() was `started`, as a progress line ends: "12.3 s"."""
    return f"{time.time() - started:.1f} s"


def format_seconds(seconds):
    if seconds is None:
        return "?"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def epoch_done(epoch, step, step_tokens):
    return f"epoch {epoch} done at step {step}: {(step + 1) * step_tokens:,} tokens seen"


def start_block(args, world_size, device, use_compile, dtype, dtype_reason, model, memory, steps,
                loaders):  # fmt: skip
    """The run's first lines. steps: (first, last, micro-steps); loaders: (train, val, val steps)"""
    (first, last, grad_accum_steps), (train_loader, val_loader, val_steps) = steps, loaders
    config, num_params = model.config, sum(p.numel() for p in model.parameters())
    weights = f" | weights of {args.init}" if args.init else ""
    tails, left_over = unread_per_epoch(train_loader)  # of one epoch: its steps, order, unread
    order, where = "in order (--no-shuffle)", "at shard ends"
    if train_loader.shuffle:
        order, where = f"shuffled by --seed {train_loader.seed}", "at the epoch's end"
    warmup_note = ""
    # a short run with 124M's 715 warmup steps, say: it barely trains
    if args.warmup_steps >= args.max_steps:
        warmup_note = (
            f"\nnote: --warmup_steps {args.warmup_steps} is not below --max_steps {args.max_steps}"
            f": the learning rate only warms up, to {100 * args.max_steps / args.warmup_steps:.3g}%"
            " of --max_lr, and never decays; lower --warmup_steps for a short run"
        )
    return (
        f"log folder  {args.log_dir} (log.txt and checkpoints)\n"
        f"device      {world_size} process(es) on {device} | "
        f"compile {'on' if use_compile else 'off'} | "
        f"autocast {str(dtype).removeprefix('torch.')}: {dtype_reason}\n"
        f"model       {num_params:,} parameters: {config.n_layer} layers, {config.n_head} heads, "
        f"{config.n_embd} channels, vocabulary {config.vocab_size}{weights}\n"
        f"{recipe_line(args)}"
        f"memory      {memory}\n"
        f"batch       {args.total_batch_size:,} tokens per step = {args.batch_size} x "
        f"{args.seq_len} x {world_size} process(es) x {grad_accum_steps} micro-steps | steps "
        f"{first} to {last}\n"
        f"data        {args.data_dir}: {describe_split(train_loader)} train, "
        f"{describe_split(val_loader)} val ({val_steps * val_loader.window:,} tokens per "
        f"evaluation)\n"
        f"epoch       {train_loader.steps_per_epoch():,} steps, {order} | unread each epoch: "
        f"{tails:,} tokens of shard tails shorter than a sequence, {left_over:,} sequences that do "
        f"not fill a step ({where}){warmup_note}"
    )


def recipe_line(args):
    """The line of what --model gave of the shape and the recipe, or "" when the flags gave all."""
    size, taken = flags.MODELS[args.model], set(args.from_model)
    random_init = not (args.init or args.resume)  # else the shape is the weights'
    shape = [name for name in flags.MODEL_SHAPE if random_init and getattr(args, name) is None]
    if not (shape or taken):
        return ""
    parts = []
    if shape:
        parts.append(" ".join(f"--{name} {size[name]}" for name in shape) + " (GPT-2's shape)")
    table = [f"--{n} {getattr(args, n):,}" for n in ("max_lr", "total_batch_size") if n in taken]
    parts += [", ".join(table) + f" (GPT-3 paper, Table 2.1: {size['row']})"] * bool(table)
    parts += ["--warmup_steps {warmup_steps} (375M tokens, as GPT-3)"] * ("warmup_steps" in taken)
    parts += ["--max_steps {max_steps:,} (10B tokens: one epoch)"] * ("max_steps" in taken)
    given = [f"--{name}" for name in flags.RECIPE_FLAGS if name not in taken]
    parts += [f"as given: {' '.join(given)}"] * bool(given)
    return f"recipe      --model {args.model}: {' | '.join(parts).format(**vars(args))}\n"


def eval_only_block(weights, model, world_size, device, dtype, dtype_reason, data_dir, val_loader,
                    val_steps, rows):  # fmt: skip
    """--eval_only's first lines; rows: how many of a batch go through the model at once."""
    batch, num_params = val_loader.B, sum(p.numel() for p in model.parameters())
    at_once = f"{min(rows, batch)} rows per forward pass"
    if rows < batch:
        at_once += f" (memory holds the logits of fewer than a batch's {batch})"
    return (
        f"weights     {weights}: {num_params:,} parameters\n"
        f"device      {world_size} process(es) on {device} | "
        f"autocast {str(dtype).removeprefix('torch.')}: {dtype_reason}\n"
        f"data        {data_dir}: {val_steps * val_loader.window:,} tokens of "
        f"{describe_split(val_loader)} val, {at_once}"
    )


def resumed(path, start_step, args, args_then):
    """The line of a resumed run (args_then: the flags of the run before)."""
    line = f"resumed from {path} at step {start_step}"
    if not in_folder(path, args.log_dir):
        line += f"; new checkpoints go to {args.log_dir}"
    if (then := args_then.get("val_tokens", args.val_tokens)) != args.val_tokens:
        line += (
            f"\nnote: --val_tokens is {args.val_tokens}, the run before was {then}: its val losses "
            "compare with this run's only roughly"
        )
    return line


def unread_per_epoch(loader):
    """(tokens at shard ends shorter than a window, windows left out of each epoch's steps)."""
    tails = sum(len(tokens) - 1 - n * loader.T for tokens, n in zip(loader.shards, loader.windows))
    return int(tails), int(loader.windows.sum()) - loader.epoch_sequences


def describe_split(loader):
    tokens = sum(len(shard) for shard in loader.shards)
    return f"{len(loader.shards)} shard{'s' if len(loader.shards) > 1 else ''}, {tokens:,} tokens"


def print_summary(progress, log_path, prompt):
    """The last block: what the run reached, and what to run next (shell-quoted)."""
    train = "-" if progress.train_loss is None else f"{progress.train_loss:.4f}"
    val = "-"
    if progress.val_loss is not None:
        val = f"{progress.val_loss:.4f} {at_step(progress.val_step)}"
    also = []  # the best and the first val loss, where they are not the last one
    if progress.best_val_step not in (None, progress.val_step):
        also.append(f"best {progress.best_val_loss:.4f} {at_step(progress.best_val_step)}")
    if progress.start_val_loss is not None and progress.val_step != -1:
        also.append(f"{progress.start_val_loss:.4f} before step 0")
    val += f" ({', '.join(also)})" if also else ""
    if progress.hellaswag is not None:
        val += f" | hellaswag acc_norm {progress.hellaswag:.4f}"
    sample = f"{script_path('sample.py')} --init {shlex.quote(progress.checkpoint)}"
    print(
        f"\ndone in {format_seconds(time.monotonic() - progress.started)}\n"
        f"final       train loss {train} | val loss {val}\n"
        f"checkpoint  {progress.checkpoint}\n"
        f"log         {log_path}\n"
        f"next        python {sample} --prompt {shlex.quote(prompt)}\n"
        f"            python {script_path('plot_log.py')} {shlex.quote(log_path)}"
    )


def at_step(step):
    return "before step 0" if step < 0 else f"at step {step}"


def script_path(name):
    """This project's script `name` as a command run from the current folder names it."""
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return shlex.quote(os.path.relpath(os.path.join(repository, name)))
