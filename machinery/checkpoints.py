"""Checkpoints: their names, reading one, what it must hold (one schema), which one --resume
continues, and the checks that keep a diverged step from ever being saved."""

import contextlib
import glob
import math
import os
import re
import zipfile

import torch

from machinery.cli import UserError
from machinery.files import in_folder

# -----------------------------------------------------------------------------
# Only the names the trainer writes count as checkpoints: not a half-written model_00042.pt.tmp,
# nor a user's copy such as model_00002_backup.pt.

CHECKPOINT_NAME = re.compile(r"model_(\d{5,})\.pt")


def checkpoint_step(path):
    """The step in a checkpoint's name (model_00042.pt: 42), or None for another name."""
    match = CHECKPOINT_NAME.fullmatch(os.path.basename(path))
    return int(match.group(1)) if match else None


def latest_checkpoint(log_dir):
    """The checkpoint of the highest step in log_dir, or None."""
    steps = {}
    for path in glob.glob(os.path.join(glob.escape(log_dir), "model_*.pt")):
        if (step := checkpoint_step(path)) is not None and os.path.isfile(path):
            steps[step] = path
    return steps[max(steps)] if steps else None


def remove_stale(log_dir):
    """Remove the trainer's checkpoints whose write was cut short; the caller holds the lock."""
    for stale in glob.glob(os.path.join(glob.escape(log_dir), "model_*.pt.tmp")):
        if checkpoint_step(stale.removesuffix(".tmp")) is not None:
            os.remove(stale)


def disk_full(filename, log_dir):
    """What a run whose disk filled up says: how to go on from its newest intact checkpoint."""
    writing = f" (writing {filename})" if filename else ""
    with contextlib.suppress(UserError, OSError):
        if newest := latest_checkpoint(log_dir):
            check_intact(newest)
            return UserError(
                f"the disk is full{writing}: free some space, then run the same command with "
                f"--resume; it continues from {newest}, which is intact"
            )
    return UserError(
        f"the disk is full{writing} and no intact checkpoint was saved yet: free some space, then "
        "run the same command again (without --resume)"
    )


# -----------------------------------------------------------------------------
# Reading. torch.save writes a zip archive whose every entry carries a CRC-32 of its bytes, which
# torch.load does not check: a checkpoint with bytes overwritten on disk would load and train on.
# Checking them reads the file once more (0.2 s per GiB from the page cache on a 2-core AMD EPYC).


def check_intact(path):
    """Refuse a checkpoint cut short, or whose bytes changed on disk since it was written."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return  # not torch's zip format: torch.load says what it is
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # the first entry whose CRC-32 fails, or None
    except (zipfile.BadZipFile, EOFError):  # its end (the zip's directory) is missing
        damaged = "its end"
    if damaged is not None:
        raise UserError(
            f"{path} is damaged on disk ({damaged} is cut short or changed since it was written): "
            "use an earlier checkpoint, or copy this one again from where it came"
        )


@contextlib.contextmanager
def reading(path):
    """Around torch.load of `path`: a file missing, damaged or not a checkpoint is one line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    check_intact(path)
    try:
        yield
    except Exception as e:
        raise UserError(
            f"{path} is not a checkpoint of this project ({type(e).__name__}): "
            "it may be truncated or another kind of file"
        ) from None


# -----------------------------------------------------------------------------
# What a checkpoint holds: wherever it is read, weights and a model config GPT can be built from; to
# be resumed, every entry of SCHEMA: one damaged or edited by hand is one line naming the entry.


def whole(value):  # a step, an epoch, a position
    return type(value) is int and value >= 0


def is_fingerprint(data):
    return isinstance(data, list) and all(isinstance(s, list) and len(s) == 3 for s in data)


SCALER_FIELDS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
LOADER_POSITION = {True: ("sequence",), False: ("shard", "position")}  # now, and before the shuffle
SCHEMA = {
    "step": whole,
    "optimizer": lambda o: isinstance(o, dict) and isinstance(o.get("state"), dict)
    and isinstance(o.get("param_groups"), list) and bool(o["param_groups"]),
    # empty where the run was not in fp16; else GradScaler's fields, with a usable scale
    "scaler": lambda s: s == {} or isinstance(s, dict) and set(SCALER_FIELDS) <= s.keys()
    and all(isinstance(s[k], (int, float)) for k in SCALER_FIELDS)
    and math.isfinite(s["scale"]) and s["scale"] > 0,
    "loader": lambda loader: isinstance(loader, dict)
    and all(whole(loader.get(k)) for k in ("epoch", *LOADER_POSITION[("sequence" in loader)]))
    and is_fingerprint(loader.get("data", [])),
    "rng": lambda rng: isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
    and rng["torch"].shape == torch.get_rng_state().shape
    and all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in rng.values()),
    "args": lambda args: isinstance(args, dict),
    "eval_pending": lambda pending: isinstance(pending, bool),
    "val_data": is_fingerprint,
}  # fmt: skip
OPTIONAL = {"args": {}, "eval_pending": False, "val_data": []}  # absent in older checkpoints


def check_checkpoint(checkpoint, path, config_class, resume=False):
    """Refuse what torch.load read unless it is our checkpoint; to `resume`, one with all of it."""
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise UserError(
            f"{path} is not a checkpoint of this project: it lacks the 'model' and 'config' entries"
        )
    check_config(checkpoint["config"], path, config_class)
    if not resume:
        return
    if "optimizer" not in checkpoint:
        raise UserError(
            f"{path} holds weights only (no optimizer state): it cannot be resumed; "
            f"start a new run from its weights with --init {path}"
        )
    if wrong := [k for k, fits in SCHEMA.items() if not fits(checkpoint.get(k, OPTIONAL.get(k)))]:
        raise UserError(
            f"{path}: its {', '.join(wrong)} entry is missing or damaged, so it cannot be resumed; "
            "resume from an earlier checkpoint (its weights still load with --init)"
        )


def check_config(config, source, config_class):
    """Refuse a model config GPT cannot be built from: another program's (nanoGPT's 'config' holds
    its training settings), or one of impossible sizes."""
    fields = set(config_class.__dataclass_fields__)
    if not isinstance(config, dict) or config.keys() != fields:
        found = sorted(config)[:4] if isinstance(config, dict) else type(config).__name__
        raise UserError(
            f"{source} is not a checkpoint of this project: its config holds {found}, not "
            f"{sorted(fields)} (checkpoints of nanoGPT and other trainers are laid out differently)"
        )
    bad = [f"{k} {v!r}" for k, v in config.items() if not (isinstance(v, int) and v > 0)]
    if bad or config["n_embd"] % config["n_head"]:
        why = ", ".join(bad) or "n_embd not divisible by n_head"
        raise UserError(
            f"{source}: its model config is impossible ({why}): sizes must be positive integers "
            "and n_embd a multiple of n_head"
        )


def check_weights_fit(expected, state, source):
    """Refuse a state dict whose names or shapes are not the model's (`expected`), or NaN or inf."""
    shapes = {key: tuple(tensor.shape) for key, tensor in expected.items()}
    # lm_head.weight: tied to the embedding, not a weight of its own
    theirs = {key: tuple(tensor.shape) for key, tensor in state.items() if key != "lm_head.weight"}
    if differ := sorted(k for k in shapes.keys() | theirs.keys() if shapes.get(k) != theirs.get(k)):
        said = [f"{k} is {theirs.get(k, 'absent')} there and {shapes.get(k, 'absent')} here"
                for k in differ[:3]]  # fmt: skip
        raise UserError(
            f"{source} does not fit this model ({'; '.join(said)}): was it saved from another "
            "model or another --n_layer/--n_head/--n_embd/--vocab_size?"
        )
    for key in expected:
        if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
            raise UserError(
                f"{source}: {key} holds NaN or inf, so its outputs would too (a run that diverged "
                "before it was saved): use an earlier checkpoint"
            )


def check_shape(config, seq_len):
    """Refuse a model shape that cannot be built, or too short a context for --seq_len."""
    if config.n_embd % config.n_head:
        raise UserError(f"--n_embd {config.n_embd} must be divisible by --n_head {config.n_head}")
    if seq_len > config.block_size:
        raise UserError(
            f"--seq_len {seq_len} is longer than the model's --block_size {config.block_size}"
        )


def check_same_model(weights, config, source, shape_flags=None):
    """Refuse a run whose config differs from `weights` (a dict): in any field on a resume, in
    `shape_flags` for --init."""
    differences = ", ".join(
        f"--{name} {weights.get(name)} there, {getattr(config, name)} here"
        for name in shape_flags or vars(config)
        if weights.get(name) != getattr(config, name)
    )
    if differences:
        raise UserError(
            f"--init {source} has another shape ({differences}): its weights set the model's "
            "shape, so leave out --n_layer/--n_head/--n_embd/--block_size"
            if shape_flags
            else f"{source} is from another model ({differences}): resume with the model flags "
            "it was trained with"
        )


# -----------------------------------------------------------------------------
# Which checkpoint --resume continues, and whether the run may write where it goes.


def to_resume(resume, log_dir, load, writes=True):
    """(path, what `load` read) of the checkpoint --resume continues, or (None, None). A run that
    `writes` (not --eval_only) must not overwrite other or newer checkpoints in --log_dir."""
    if resume is None:
        if writes and latest_checkpoint(log_dir):  # every rank checks
            raise UserError(
                f"{log_dir} already holds checkpoints: pass --resume to continue that run, or "
                "choose another --log_dir"
            )
        return None, None
    if not resume.strip():
        raise UserError(
            "--resume '' names no checkpoint: pass a file or a folder, or --resume alone for "
            "--log_dir's"
        )
    folder = log_dir if resume == "latest" else resume
    by_folder = resume == "latest" or os.path.isdir(folder)
    if by_folder:
        resume = latest_checkpoint(folder)
        if resume is None:
            raise UserError(
                f"--resume: no checkpoint model_*.pt in {folder}: start without --resume, or pass "
                "--log_dir of the run"
            )
    if resume.endswith(".tmp"):
        raise UserError(
            f"--resume {resume}: a .tmp file is a checkpoint whose write was cut short, not a "
            "checkpoint; pass the model_XXXXX.pt before it"
        )
    try:
        checkpoint = load(resume)  # first: a file that is no checkpoint is said as such
    except UserError as e:  # a torn newest checkpoint, say: the one before it once it is moved
        others = glob.glob(os.path.join(glob.escape(folder), "model_*.pt")) if by_folder else []
        if not any(checkpoint_step(p) is not None and p != resume for p in others):
            raise
        raise UserError(
            f"{e}; move it out of {os.path.dirname(resume) or '.'} to resume the one before it"
        ) from None
    named, step = checkpoint_step(resume), checkpoint.get("step")
    beside = writes and in_folder(resume, log_dir)  # the resumed run's checkpoints go beside it
    if beside and named is not None and whole(step) and step < named:  # --resume takes the newest
        raise UserError(
            f"{resume} holds step {step}, not the step {named} of its name (a renamed copy?): "
            f"resumed, its checkpoints would sort before it, and the next --resume would go back "
            f"to step {step}; rename it model_{step:05d}.pt"
        )
    kept = writes and latest_checkpoint(log_dir)  # a file or the newest in a folder: one rule
    if kept and not in_folder(resume, log_dir):
        raise UserError(
            f"--log_dir {log_dir} holds checkpoints of another run ({os.path.basename(kept)}): "
            f"resuming {resume} there would overwrite them; pass an empty --log_dir for the "
            "resumed run"
        )
    if kept and not os.path.samefile(kept, resume) and whole(step) and step < checkpoint_step(kept):
        raise UserError(
            f"--log_dir {log_dir} holds {os.path.basename(kept)}, newer than {resume}: training "
            "on from an earlier checkpoint there would overwrite the newer ones, and the next "
            "--resume would take them; pass a new --log_dir for this resume, or move the newer "
            "checkpoints away"
        )
    return resume, checkpoint


def check_resumed_run(checkpoint, path, start_step, args):
    """A resumed run has steps (or its last evaluation) still to do, and keeps its --model: another
    would change the defaults of the learning rate, batch, warmup and steps unsaid."""
    if start_step >= args.max_steps and not checkpoint.get("eval_pending", False):
        raise UserError(
            f"the checkpoint is after step {start_step - 1} and --max_steps is {args.max_steps}: "
            "nothing to train; raise --max_steps to train on"
        )
    then = checkpoint.get("args", {}).get("model", "gpt2")  # from before --model: 124M's recipe
    if then != args.model:
        raise UserError(
            f"{path} was trained with --model {then}, this run has --model {args.model}: resume "
            f"with --model {then} (it sets the defaults of --max_lr, --total_batch_size, "
            "--warmup_steps and --max_steps)"
        )


# -----------------------------------------------------------------------------
# Divergence: a loss, gradient or weight that is inf or NaN will not come back, so the run stops
# before such weights are saved, and names the checkpoint to go back to.


def check_finite(train_loss, norm, loss_scaling, step, log_dir):
    """Stop at a step whose loss or gradient norm is inf or NaN. With fp16 (loss_scaling) the scaler
    skips steps whose gradients overflowed: only the loss must be finite."""
    if not (math.isfinite(train_loss) and (loss_scaling or math.isfinite(norm.item()))):
        stop_diverged(step, f"loss {train_loss} / grad norm {norm.item()} is not finite", log_dir)


def check_finite_weights(model, step, log_dir, procs, device):
    """A step can leave inf or NaN weights behind a finite loss (a learning rate far too high):
    checked on every rank (its shards) before each evaluation and checkpoint, so none is saved."""
    weights = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    if procs.any(not torch.stack([torch.isfinite(p).all() for p in weights]).all(), device):
        stop_diverged(step, "the loss is finite, but the weights after the step are not", log_dir)


def stop_diverged(step, fault, log_dir):
    advice = "no checkpoint was saved yet: start again"
    if kept := latest_checkpoint(log_dir):
        advice = f"last good checkpoint: {kept}: resume from it"
    raise UserError(
        f"step {step}: {fault}; stopping without saving. {advice} with a lower --max_lr (or "
        "check --weight_decay, --beta2, --eps, --grad_clip)"
    )
