"""The processes of a torchrun group: its variables, joining it, one error line for it, the log
folder's lock across ranks, --shard (ZeRO-1, FSDP2), and stop requests that let a run save."""

import contextlib
import os
import signal
import socket
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from machinery import checkpoints
from machinery.cli import DISK_FULL, DiskFull, UserError
from machinery.files import output_lock

# -----------------------------------------------------------------------------
# torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR and MASTER_PORT, where the group
# meets) in each process it starts. A leftover one (a cluster's prologue, an old export) must not
# make one process a rank of a group that does not exist.


@dataclass(frozen=True)
class Processes:
    """This process's place in the group (one process: the defaults), and the run's collectives."""

    ddp: bool = False
    rank: int = 0
    local_rank: int = 0  # the GPU of this process on its machine
    world_size: int = 1

    @property
    def master(self):
        return self.rank == 0  # only rank 0 prints, logs and saves

    def print(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)

    def reduced(self, number, op, device):
        """`number` reduced by `op` over the ranks: every rank gets the same answer."""
        if not self.ddp:
            return number
        value = torch.tensor(number, device=device)
        dist.all_reduce(value, op=op)
        return value.item()

    def any(self, flag, device):
        return self.reduced(float(flag), dist.ReduceOp.SUM, device) > 0  # true on any rank

    def smallest(self, number, device):
        return self.reduced(number, dist.ReduceOp.MIN, device)  # what every rank can do

    def from_rank_0(self, value, device):
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.ddp:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=device)
        return box[0]

    def mean(self, tensor):
        """The mean of `tensor` over the ranks (summed, then divided: gloo has no average)."""
        if self.ddp:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor


GROUP_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def variables():
    """(rank, local_rank, world_size) as torchrun sets them; None where none is set: one process."""
    env = os.environ
    present = [name for name in GROUP_VARIABLES if env.get(name, "").strip()]
    if not present:
        return None
    given = " ".join(f"{name}={env[name]}" for name in present)
    needed = (*GROUP_VARIABLES, "MASTER_ADDR", "MASTER_PORT")
    missing = [name for name in needed if not env.get(name, "").strip()]
    if missing:
        raise UserError(
            f"{given} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            f"start the processes with torchrun, which sets them all, or unset {' '.join(present)} "
            "for one process"
        )
    try:
        rank, local_rank, world_size = (int(env[name]) for name in GROUP_VARIABLES)
    except ValueError:
        raise UserError(f"{given}: each must be a whole number, as torchrun sets them") from None
    if not (0 <= local_rank <= rank < world_size):
        raise UserError(
            f"{given}: a group needs 0 <= LOCAL_RANK <= RANK < WORLD_SIZE, as torchrun sets them"
        )
    port = env["MASTER_PORT"].strip()
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise UserError(
            f"MASTER_PORT={port}: the group's port must be a number from 1 to 65535, "
            "as torchrun sets it"
        )
    return rank, local_rank, world_size


@contextlib.contextmanager
def waiting_for_peers(procs):
    """Around init_process_group: a MASTER_ADDR that does not resolve is refused (torch would retry
    it for half an hour), a rank started by hand says that it waits for the others, and Ctrl-C and
    SIGTERM end the wait (torch waits in C++, where Python's handlers would run too late)."""
    address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    try:
        socket.getaddrinfo(address, int(port), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:  # UnicodeError: a name that is no host name at all
        raise UserError(
            f"MASTER_ADDR={address}: no such host ({getattr(e, 'strerror', None) or e}): "
            "set it to rank 0's host name or address"
        ) from None
    if "TORCHELASTIC_RUN_ID" not in os.environ and procs.world_size > 1:
        last = procs.world_size - 1
        others = "rank 0" if procs.rank else f"ranks 1 to {last}" if last > 1 else "rank 1"
        print(f"rank {procs.rank} of {procs.world_size}: waiting for {others} at {address}:{port} "
              "(set by MASTER_ADDR, MASTER_PORT); start every rank, "
              "or unset RANK, LOCAL_RANK and WORLD_SIZE; Ctrl-C stops the wait",
              file=sys.stderr, flush=True)  # fmt: skip
    handlers = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except dist.DistNetworkError as e:  # rank 0 could not open the group's port
        if "EADDRINUSE" not in str(e):
            raise
        raise UserError(
            f"MASTER_PORT={port} on {address} is in use by another program (another run?): "
            "pass a free port (torchrun --master_port, or MASTER_PORT)"
        ) from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def log_dir_lock(log_dir, procs, device):
    """Rank 0 locks --log_dir for the run before anything is read or removed; all ranks learn it."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if procs.master:
            try:
                stack.enter_context(output_lock(log_dir, "--log_dir"))
            except UserError as e:
                refusal = e
        if procs.any(refusal is not None, device):
            if refusal is None:  # this rank's echo of rank 0's refusal: run_cli says nothing
                refusal = UserError(f"rank 0 could not lock --log_dir {log_dir}")
                refusal.speaks = False
            raise refusal
        try:
            yield
        except (OSError, DiskFull) as e:  # rank 0's log or checkpoint: how to go on, if at all
            if isinstance(e, OSError) and e.errno not in DISK_FULL:
                raise
            raise checkpoints.disk_full(e.filename, log_dir) from None


@contextlib.contextmanager
def one_error_line(procs):
    """A user error on any rank of a group is said once, naming its rank: the first rank to fail
    (counted in the group's store) says it, and a rank that a failed peer leaves stuck in a
    collective exits without a traceback (torchrun then ends the group)."""
    try:
        yield
    except (UserError, RuntimeError) as e:
        if not (procs.ddp and dist.is_initialized()) or getattr(e, "speaks", None) is False:
            raise  # one process; or a rank's echo of an error that another rank says
        user_error = isinstance(e, UserError)
        try:
            store = dist.distributed_c10d._get_default_store()
            errors_before = store.add("user_errors", int(user_error)) - int(user_error)
        except Exception:  # the store went with a failed peer
            errors_before = None
        if not user_error and errors_before == 0:
            raise  # no rank reported a user error: this failure's traceback is the report
        error = UserError(
            f"rank {procs.rank}: {e}" if user_error else "stopped: another rank of the group failed"
        )
        error.speaks = user_error and not errors_before
        raise error from None


# -----------------------------------------------------------------------------
# --shard optimizer: PyTorch's ZeRO-1. DDP still gives every rank all the gradients; each rank keeps
# AdamW's two moments of its share of the parameters only, updates that share, and broadcasts it.
# A checkpoint stays one file of a plain AdamW's state, gathered on rank 0: it resumes on any
# --shard and any number of ranks, and every script reads it as before.


def sharded_adamw(groups, **adamw):
    """AdamW sharded over the ranks (ZeRO-1); imported here, as it takes 0.6 s to import."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    class ShardedAdamW(ZeroRedundancyOptimizer):
        def state_dict(self):
            # On rank 0 after whole_state(), in a plain AdamW's layout: ZeRO's groups hold only
            # the arguments given, AdamW's every one (amsgrad, ...).
            state = super().state_dict()
            for group in state["param_groups"]:
                for name, value in self.optim.defaults.items():
                    group.setdefault(name, value)
            return state

    return ShardedAdamW(groups, optimizer_class=torch.optim.AdamW, **adamw)


# -----------------------------------------------------------------------------
# --shard full: PyTorch's FSDP2. Each rank keeps 1/ranks of every weight, gradient and AdamW moment.
# A block's whole weights are gathered just before its forward (and again for its backward) and
# freed after; its gradients are reduce-scattered onto the shards. The checkpoint is the same one
# file: rank 0 gathers the whole weights and a plain AdamW's state, and writes them.


def fully_shard_model(model, dtype):
    """Shard each block, then the rest (embeddings, final LayerNorm) as the root, in place."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if dtype == torch.float16:  # the loss scaler's overflow check would see only this rank's shard
        raise UserError("--shard full trains in bf16 or fp32, not fp16: pass --dtype bfloat16 "
                        "where the GPU has it, or use --shard optimizer")  # fmt: skip
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    # sampling calls generate, not forward: it gathers the root's weights as forward does
    register_fsdp_forward_method(model, "generate")
    # forward returns its logits as a slice of the padded vocabulary's (a view), which no caller
    # changes in place: FSDP2's warning about that is noise here
    warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor")


def is_fully_sharded(model):
    return hasattr(model, "reshard")  # what fully_shard adds to a module's class


@contextlib.contextmanager
def root_weights_gathered(model):
    """HellaSwag calls the model's methods, not forward, where FSDP2 gathers the root's weights."""
    if not is_fully_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def parameter_names(model, optimizer):
    """The name of each parameter in the optimizer's order: a plain AdamW's number for it."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def renumbered(state, new_keys):
    """An optimizer state with its parameters' keys (names or numbers) mapped through new_keys."""
    groups = [dict(g, params=[new_keys[p] for p in g["params"]]) for g in state["param_groups"]]
    return {"state": {new_keys[p]: s for p, s in state["state"].items()}, "param_groups": groups}


def whole_state(model, optimizer, procs):
    """A plain model's and AdamW's state dicts on rank 0 (None elsewhere); every rank calls it."""
    if is_fully_sharded(model):
        from torch.distributed.checkpoint import state_dict as dcp

        options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # all on rank 0
        weights = dcp.get_model_state_dict(model, options=options)
        state = dcp.get_optimizer_state_dict(model, optimizer, options=options)
        numbers = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
        return (weights, renumbered(state, numbers)) if procs.master else (None, None)
    if hasattr(optimizer, "consolidate_state_dict"):  # --shard optimizer: each share to rank 0
        optimizer.consolidate_state_dict(to=0)
    return (model.state_dict(), optimizer.state_dict()) if procs.master else (None, None)


def load_optimizer_state(model, optimizer, state):
    """A checkpoint's optimizer state (a plain AdamW's) into the run's optimizer, sharded or not."""
    if not is_fully_sharded(model):
        optimizer.load_state_dict(state)  # ZeroRedundancyOptimizer keeps its share of it
        return
    from torch.distributed.checkpoint import state_dict as dcp

    named = renumbered(state, parameter_names(model, optimizer))
    options = dcp.StateDictOptions(full_state_dict=True)  # every rank read the whole file
    dcp.set_optimizer_state_dict(model, optimizer, named, options=options)


# -----------------------------------------------------------------------------
# Stop requests.


class StopRequest:
    """SIGINT/SIGTERM/SIGHUP (Ctrl-C, a cluster's preemption, a closed terminal) ask the run to
    stop: it finishes the step (an evaluation stops between batches), saves and exits 0. A second
    Ctrl-C stops at once, discarding a checkpoint being written (atomic_write)."""

    def __init__(self, procs, device):
        self.requested, self.procs, self.device = False, procs, device
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
        name = signal.Signals(signum).name
        notice = f"\n{name}: saving a checkpoint after this step, then stopping\n"
        # os.write, not print: the signal can arrive in the middle of a print (say, one blocked on a
        # full pipe), and print cannot be re-entered: it would raise, and the run would not save.
        with contextlib.suppress(OSError):
            if self.procs.master:  # one notice for the group
                os.write(sys.stdout.fileno(), notice.encode())

    def agreed(self):
        """Whether any rank was asked to stop, on every rank (--shard full's forward needs all)."""
        return self.procs.any(self.requested, self.device)
