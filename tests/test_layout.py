"""The layout: imports, torch-free light tools, docstrings, the README's map of the code, and a
fresh run's pinned losses, so moving code between files cannot change what a run computes."""

import ast
import glob
import graphlib
import os
import re

import numpy as np
import pytest

from conftest import REPO, TINY_MODEL, run_script


def project_files():
    """{module name: path} of the scripts and of machinery's modules (as machinery.x)."""
    files = {os.path.basename(p)[:-3]: p for p in sorted(glob.glob(os.path.join(REPO, "*.py")))}
    for path in sorted(glob.glob(os.path.join(REPO, "machinery", "*.py"))):
        if not path.endswith("__init__.py"):
            files["machinery." + os.path.basename(path)[:-3]] = path
    assert {"machinery.cli", "train_gpt2", "fineweb", "plot_log"} <= files.keys(), files
    return files


def parse(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def imports(path):
    """What the module imports anywhere (machinery.x by its whole name, others by package)."""
    names = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "machinery":
                names.update("machinery." + alias.name for alias in node.names)
            else:
                machinery = node.module.startswith("machinery.")
                names.add(node.module if machinery else node.module.split(".")[0])
    return names


def test_no_import_cycle_and_cli_imports_no_project_module_and_no_torch():
    """No project module imports itself back, even through others or inside a function.
    machinery/cli.py, which every script imports, is the graph's bottom: it costs nothing."""
    files = project_files()
    graph = {name: imports(path) & files.keys() for name, path in files.items()}
    try:  # graphlib reads the graph as {module: the modules it needs first}
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        pytest.fail("import cycle: " + " -> ".join(reversed(error.args[1])))
    assert not graph["machinery.cli"], sorted(graph["machinery.cli"])
    assert "torch" not in imports(files["machinery.cli"])


def test_fineweb_and_plot_log_do_not_import_torch():
    result = run_script("-c", "import fineweb, plot_log, sys; print('torch' in sys.modules)")
    assert (result.returncode, result.stdout) == (0, "False\n"), result.stdout + result.stderr


def test_every_module_opens_with_a_docstring():
    files = project_files().items()
    missing = [name for name, path in files if not (ast.get_docstring(parse(path)) or "").strip()]
    assert not missing, missing


def make_pattern_shards(directory):
    """A val shard (1,024 tokens) and two train shards (2,048) of a tiled 101-token pattern of 64
    ids, 10% replaced at random: structure the loss learns, independent of the repository."""
    rng = np.random.default_rng(1)
    vocab = rng.choice(50257, 64, replace=False)
    pattern = rng.integers(0, 64, 101)

    def stream(n):
        ids = np.resize(pattern, n)
        noisy = rng.random(n) < 0.1
        ids[noisy] = rng.integers(0, 64, int(noisy.sum()))
        return vocab[ids].astype(np.uint16)

    np.save(directory / "pattern_val_000000.npy", stream(1024))
    np.save(directory / "pattern_train_000001.npy", stream(2048))
    np.save(directory / "pattern_train_000002.npy", stream(2048))


PINNED_RUN = (
    TINY_MODEL
    + (
        "--device cpu --no-hellaswag --no-sample_every_eval --max_lr 3e-3 --max_steps 8 "
        "--warmup_steps 2 --eval_every 4 --val_tokens 512 --ckpt_every 100 --batch_size 2 "
        "--seq_len 32 --total_batch_size 128"
    ).split()
)

# log.txt of PINNED_RUN on make_pattern_shards, as the code before the split into files wrote it:
# the val losses at steps -1 (the starting weights, not evaluated by the code before the split), 3
# and 7, and the train losses of steps 0 to 7.
PINNED_LOSSES = {
    "shuffled": (
        "10.8327 9.9095 9.3647",
        "10.851755 10.599316 10.401167 10.123468 9.915699 9.668135 9.540211 9.407516",
    ),
    "in_order": (
        "10.8327 9.8063 9.1960",
        "10.830958 10.639566 10.370674 10.107255 9.786827 9.559671 9.373323 9.268547",
    ),
}


def pinned_log(order):
    """PINNED_LOSSES[order] as the lines of log.txt, split into words."""
    val, train = (losses.split() for losses in PINNED_LOSSES[order])
    lines = [["-1", "val", val[0]]]
    for step, loss in enumerate(train):
        lines.append([str(step), "train", loss])
        if step % 4 == 3:  # --eval_every 4
            lines.append([str(step), "val", val[(step + 1) // 4]])
    return lines


# Train losses are compared to 2e-5, not as printed: the float kernels' summation order depends on
# the CPU (its vector width, the library's code path for it), and with it the last digits of a loss.
# Such a change is about 1e-6 over these 8 steps (two threads instead of one move step 7's loss by
# 1e-6); a change of the data order, the init or the schedule moves the losses by 1e-3 or more. Val
# losses are printed to 4 decimals and compared as printed (the pinned ones are 1.6e-5 or more from
# a rounding boundary).
TRAIN_TOLERANCE = 2e-5


@pytest.mark.parametrize("order", PINNED_LOSSES)
def test_fresh_run_losses_are_pinned(order, tmp_path):
    """A fresh tiny run, shuffled and in order, logs the train and val losses that the code logged
    before it was split into files: the same init, data order, schedule and arithmetic."""
    # here, so that the layout tests above report even when train_gpt2.py does not import

    import train_gpt2

    data_dir, log_dir = tmp_path / "data", tmp_path / "log"
    data_dir.mkdir()
    make_pattern_shards(data_dir)
    shuffle = [] if order == "shuffled" else ["--no-shuffle"]
    argv = [*PINNED_RUN, *shuffle, "--data_dir", str(data_dir), "--log_dir", str(log_dir)]
    train_gpt2.main(argv)  # on one thread (conftest): the sums' order is not the cores'
    logged = [line.split() for line in (log_dir / "log.txt").read_text().splitlines()]
    pinned = pinned_log(order)
    assert [line[:2] for line in logged] == [line[:2] for line in pinned], logged
    for (step, kind, loss), (_, _, expected) in zip(logged, pinned):
        train_close = kind == "train" and abs(float(loss) - float(expected)) <= TRAIN_TOLERANCE
        assert train_close or loss == expected, f"step {step} {kind} {loss}, pinned {expected}"


def definitions(path):
    """{name: first line (its decorators')} of top-level defs, assignments and Class.method."""

    def first_line(node):
        return node.decorator_list[0].lineno if node.decorator_list else node.lineno

    found = {}
    for node in parse(path).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = first_line(node)
            for member in node.body if isinstance(node, ast.ClassDef) else []:
                if isinstance(member, ast.FunctionDef):
                    found[f"{node.name}.{member.name}"] = first_line(member)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node.lineno
    return found


def test_readme_map_names_the_code_in_order():
    """Names that train_gpt2.py defines, in its order: the map cannot go stale."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    table = readme.split("## Reading the code beside the lecture", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| ")][2:]
    named = [name for row in rows for name in re.findall(r"`([A-Za-z_][A-Za-z_.]*)`", row[2])]
    defined = definitions(project_files()["train_gpt2"])
    assert named, "the map names no code"
    assert not [n for n in named if n not in defined], named
    lines = [defined[name] for name in named]
    assert lines == sorted(lines), "the map names the code out of order"
