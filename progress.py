"""What a run tells the person watching it: the start-up block, each step's line with its speed, MFU,
elapsed time and an estimate of the time left, and the last block with the commands to run next.

Not in train_gpt2.py because it is all formatting: the tutorial's loop computes the numbers, and this
file turns them into lines. It imports nothing of the project (and not torch), so it can be read alone.
"""

import os
import shlex
import time


class Progress:
    """Where the run is: for each step's elapsed time and estimate of the time left, and the last block."""

    def __init__(self, first_step, last_step):
        self.first_step, self.last_step = first_step, last_step
        self.started = self.last_step_end = time.monotonic()
        self.seconds_per_step = None  # smoothed over recent steps, evaluations and checkpoints included
        self.train_loss = self.val_loss = self.best_val_loss = self.best_val_step = None
        self.hellaswag = self.checkpoint = self.start_val_loss = None

    def label(self, step):
        if step < 0:  # the evaluation of the starting weights
            return "before step 0"
        return f"step {step:{len(str(self.last_step))}d}/{self.last_step}"

    def step_done(self, step):
        """(seconds since the start, estimated seconds left, None until there is an estimate)."""
        now = time.monotonic()
        interval, self.last_step_end = now - self.last_step_end, now
        if step > self.first_step:  # the first step compiles and warms up: it says nothing of the others
            smoothed = self.seconds_per_step
            self.seconds_per_step = interval if smoothed is None else 0.9 * smoothed + 0.1 * interval
        left = None if self.seconds_per_step is None else self.seconds_per_step * (self.last_step - step)
        return now - self.started, left

    def val_done(self, step, val_loss):
        self.val_loss = val_loss
        if step < 0:
            self.start_val_loss = val_loss
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.best_val_step = val_loss, step


def step_line(progress, step, train_loss, lr, norm, dt, tokens, mfu=None, memory_gib=None):
    """The step's line on stdout: where the run is, its numbers, how fast it goes, and how long it has left.
    mfu: the model's arithmetic per second as a share of the devices' peak (None when the peak is unknown)."""
    progress.train_loss = train_loss
    elapsed, left = progress.step_done(step)
    speed = f"{1000 * dt:.0f} ms | {tokens / dt:,.0f} tok/s"
    if mfu is not None:
        speed += f" | mfu {100 * mfu:.1f}%"
    if memory_gib is not None:
        speed += f" | mem {memory_gib:.1f} GiB"
    return (
        f"{progress.label(step)} | loss {train_loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | {speed} | "
        f"{format_seconds(elapsed)} elapsed, {format_seconds(left)} left"
    )


def format_seconds(seconds):
    if seconds is None:
        return "?"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def start_block(args, world_size, device, use_compile, dtype, dtype_reason, num_params, config, memory, steps, loaders):
    """The run's first lines: where it writes, what computes, the model, its memory, the batch, the data and
    one epoch. steps: (first, last, micro-steps per step); loaders: (train, val, tokens per evaluation)."""
    (first, last, grad_accum_steps), (train_loader, val_loader, val_tokens) = steps, loaders
    weights = f" | weights of {args.init}" if args.init else ""
    warmup_note = ""
    if args.warmup_steps >= args.max_steps:  # a short run with 124M's 715 warmup steps, say: it barely trains
        warmup_note = (
            f"\nnote: --warmup_steps {args.warmup_steps} is not below --max_steps {args.max_steps}: the learning rate "
            f"only warms up, to {100 * args.max_steps / args.warmup_steps:.3g}% of --max_lr, and never decays; lower "
            "--warmup_steps for a short run"
        )
    return (
        f"log folder  {args.log_dir} (log.txt and checkpoints)\n"
        f"device      {world_size} process(es) on {device} | compile {'on' if use_compile else 'off'} | "
        f"autocast {str(dtype).removeprefix('torch.')}: {dtype_reason}\n"
        f"model       {num_params:,} parameters: {config.n_layer} layers, {config.n_head} heads, "
        f"{config.n_embd} channels, vocabulary {config.vocab_size}{weights}\n"
        f"memory      {memory}\n"
        f"batch       {args.total_batch_size:,} tokens per step = {args.batch_size} x {args.seq_len} x {world_size} "
        f"process(es) x {grad_accum_steps} micro-steps | steps {first} to {last}\n"
        f"data        {args.data_dir}: {describe_split(train_loader)} train, {describe_split(val_loader)} val "
        f"({val_tokens:,} tokens per evaluation)\n"
        f"epoch       {describe_epoch(train_loader)}{warmup_note}"
    )


def eval_only_block(
    weights, num_params, world_size, device, dtype, dtype_reason, data_dir, val_tokens, val_loader, rows
):
    """--eval_only's first lines: the weights, what computes, the val tokens it reads and how many rows
    of a batch go through the model at once (fewer than the batch where memory is short)."""
    batch = val_loader.B
    at_once = f"{batch} rows per forward pass"
    if rows < batch:
        at_once = f"{rows} rows per forward pass (memory holds the logits of fewer than a batch's {batch})"
    return (
        f"weights     {weights}: {num_params:,} parameters\n"
        f"device      {world_size} process(es) on {device} | "
        f"autocast {str(dtype).removeprefix('torch.')}: {dtype_reason}\n"
        f"data        {data_dir}: {val_tokens:,} tokens of {describe_split(val_loader)} val, "
        f"{at_once}"
    )


def resumed(path, start_step, log_dir, in_log_dir, args_then, val_tokens):
    """The line of a resumed run: where it continues, where its checkpoints go (in_log_dir: the checkpoint
    is in --log_dir), and whether it evaluates on as many val tokens as the run before (args_then: the
    checkpoint's flags; --seq_len cannot change: the loader refuses it)."""
    line = f"resumed from {path} at step {start_step}{'' if in_log_dir else f'; new checkpoints go to {log_dir}'}"
    then = args_then.get("val_tokens", val_tokens)
    if then != val_tokens:
        line += (
            f"\nnote: --val_tokens is {val_tokens}, the run before was {then}: its val losses "
            "compare with this run's only roughly"
        )
    return line


def describe_epoch(loader):
    """One epoch of the train split: its steps, its order, and what it leaves unread."""
    tails, left_over = loader.unread_per_epoch()
    order = f"shuffled by --seed {loader.seed}" if loader.shuffle else "in order (--no-shuffle)"
    where = "at the epoch's end" if loader.shuffle else "at shard ends"
    return (
        f"{loader.steps_per_epoch():,} steps, {order} | unread each epoch: {tails:,} tokens of shard tails "
        f"shorter than a sequence, {left_over:,} sequences that do not fill a step ({where})"
    )


def describe_split(loader):
    tokens = sum(len(shard) for shard in loader.shards)
    return f"{len(loader.shards)} shard{'s' if len(loader.shards) > 1 else ''}, {tokens:,} tokens"


def print_summary(progress, log_path, prompt):
    """The last block: what the run reached, where it is, and what to run next (commands quoted for the shell)."""
    val = "-" if progress.val_loss is None else f"{progress.val_loss:.4f}"
    best = ""
    if progress.best_val_step is not None:
        at = "before step 0" if progress.best_val_step < 0 else f"at step {progress.best_val_step}"
        best = f" (best {progress.best_val_loss:.4f} {at})"
    if progress.start_val_loss is not None:
        best += f" | val loss before step 0 {progress.start_val_loss:.4f}"
    hellaswag = "" if progress.hellaswag is None else f" | hellaswag acc_norm {progress.hellaswag:.4f}"
    print(f"\ndone in {format_seconds(time.monotonic() - progress.started)}")
    print(f"final       train loss {progress.train_loss:.4f} | val loss {val}{best}{hellaswag}")
    print(f"checkpoint  {progress.checkpoint}")
    print(f"log         {log_path}")
    sample, plot = script_path("sample.py"), script_path("plot_log.py")
    print(f"next        python {sample} --init {shlex.quote(progress.checkpoint)} --prompt {shlex.quote(prompt)}")
    print(f"            python {plot} {shlex.quote(log_path)}")


def script_path(name):
    """A script of this project as a command run from the current folder names it (sample.py in the clone)."""
    return shlex.quote(os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), name)))
