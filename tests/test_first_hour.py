"""What a new user meets first: the README's tiny CPU run as written, the dtype that `--dtype auto`
picks, and `--help` pages that show every default once."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

import export_hf
import fineweb
import hellaswag
import plot_log
import sample
import train_gpt2
from conftest import REPO, TINY_RUN, run_trainer, snapshot
from machinery import devices
from machinery.cli import run_cli
from machinery.tokenizer import gpt2_tokenizer


def command_blocks(path):
    """The ```bash blocks of a markdown file, as lists of shell lines (continuations joined)."""
    with open(path) as f:
        blocks = re.findall(r"^```bash\n(.*?)^```", f.read(), re.M | re.S)
    joined = (block.replace("\\\n", " ") for block in blocks)
    return [[line for line in block.splitlines() if line.strip()] for block in joined]


# What the test does with the README's commands that a 2-core CPU without network cannot run as
# written: skip them (why), or run a stand-in. Every other command runs word for word, with flags
# appended that shrink it (argparse keeps a flag's last value) and the tiny run's checkpoint for the
# checkpoints of longer runs that the README names.
SKIPPED = {
    "python3 -m venv": "the suite runs in the interpreter it was started with (a venv or not)",
    "pip install": "CI has installed the requirements",
    "python fineweb.py && torchrun": "FineWeb-edu's download and 8 GPUs",
    "python -m pytest": "the suite itself",
    "python sample.py --init gpt2 --prompt": (
        "OpenAI's weights from the hub (sample.py --init ./gpt2 runs below)"
    ),
    "python hellaswag.py": "HellaSwag's download",
    "python fineweb.py --input notes/": "the reader's own files",
    "python train_gpt2.py --data_dir my_data": "the reader's own files",
    "python train_gpt2.py --resume": "a 124M run's checkpoint in log/",
    "torchrun --standalone --nproc_per_node=8": "8 GPUs",
}
STAND_INS = {
    "curl -o shakespeare.txt": "cp readme_x3.txt shakespeare.txt",  # real English, ~20K tokens
    "hf download openai-community/gpt2": (
        "python export_hf.py --init log_cpu/model_00005.pt --out gpt2"
    ),
}
SHRINK = {
    "python fineweb.py": " --shard_size 8000",
    "python train_gpt2.py": (
        " --n_layer 1 --n_embd 32 --max_steps 6 --warmup_steps 2 --eval_every 3 --ckpt_every 3 "
        "--val_tokens 512 --batch_size 4 --seq_len 64 --total_batch_size 256"
    ),
    "python sample.py": " --max_new_tokens 8",
}
LONGER_RUNS = {
    "log/model_19072.pt": "log_cpu/model_00005.pt",
    "model_00249.pt": "model_00005.pt",
    "model_00019.pt": "model_00005.pt",
    "log/log.txt": "log_cpu/log.txt",
    # the fine-tune starts from the tiny run's export (hf download's stand-in)
    "--init gpt2 ": "--init ./gpt2 ",
}


def as_run_here(line):
    """The command the test runs for a README line, or None to skip it."""
    if any(line.startswith(prefix) for prefix in SKIPPED):
        return None
    for prefix, stand_in in STAND_INS.items():
        if line.startswith(prefix):
            return stand_in
    for longer, tiny in LONGER_RUNS.items():
        line = line.replace(longer, tiny)
    for script, flags in SHRINK.items():
        if script + " " in line or line.endswith(script):
            line = line.split(" #")[0] + flags  # after the command, before a trailing comment
    return line


def path_with_this_python(tmp_path):
    """PATH where `python` is this interpreter (a wrapper script: a link would lose a venv's
    packages), then the interpreter's folder (a venv's tools), then the PATH of the tests."""
    wrapper = tmp_path / "bin" / "python"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    folders = [wrapper.parent, os.path.dirname(sys.executable), os.environ["PATH"]]
    return os.pathsep.join(map(str, folders))


def test_readme_commands_run_in_order_in_a_fresh_copy_and_overwrite_nothing(tmp_path):
    """The README's CPU-sized blocks, then docs/data-and-resume.md's data-order one, by bash in a
    copy of the repository: each exits 0 and changes no file that was there before it."""
    clone = tmp_path / "clone"
    for name in subprocess.check_output(["git", "ls-files"], cwd=REPO, text=True).splitlines():
        if os.path.isfile(os.path.join(REPO, name)):
            os.makedirs(clone / os.path.dirname(name), exist_ok=True)
            shutil.copy(os.path.join(REPO, name), clone / name)
    (clone / "readme_x3.txt").write_text((clone / "README.md").read_text() * 3)
    env = {**os.environ, "PATH": path_with_this_python(tmp_path), "HF_HUB_OFFLINE": "1"}

    data_and_resume = command_blocks(clone / "docs" / "data-and-resume.md")
    data_order = next(block for block in data_and_resume if "head -c" in block[0])
    outputs = {}
    for block in command_blocks(clone / "README.md") + [data_order]:
        script = [as_run_here(line) for line in block]
        if not any(script):
            continue
        before = snapshot(clone)
        result = subprocess.run(["bash", "-ec", "\n".join(line for line in script if line)],
                                cwd=clone, env=env,
                                capture_output=True, text=True, timeout=900)  # fmt: skip
        assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
        after = snapshot(clone)
        changed = [name for name, digest in before.items() if after.get(name) != digest]
        assert not changed, f"{script} changed or removed {changed}"
        outputs["\n".join(block)] = result.stdout
    assert (
        len(outputs) == 6
    )  # the tiny run, sampling from ./gpt2, the fine-tune, plot, export, data order

    # The tiny run's last block names a checkpoint and a log that exist, and the next commands.
    train_output = next(out for first, out in outputs.items() if "curl" in first)
    last_block = train_output[train_output.rindex("\ndone in ") :]
    checkpoint = re.search(r"^checkpoint  (\S+)$", last_block, re.M).group(1)
    log = re.search(r"^log         (\S+)$", last_block, re.M).group(1)
    assert checkpoint == "log_cpu/model_00005.pt" and os.path.isfile(clone / checkpoint)
    assert log == "log_cpu/log.txt" and os.path.isfile(clone / log)
    next_sample = re.search(r"^next        (python sample\.py .*)$", last_block, re.M).group(1)
    assert shlex.split(next_sample)[:4] == ["python", "sample.py", "--init", checkpoint]
    assert f"python plot_log.py {log}" in last_block
    # the last val loss and its step, then the best (where another) and the first's
    final = r"^final       train loss \d+\.\d+ \| val loss \d+\.\d+ at step \d+ \((best .*, )?"
    final += r"\d+\.\d+ before step 0\)$"
    assert re.search(final, last_block, re.M)
    assert "sample 1/2" in train_output and "ROMEO:" in train_output
    # the starting weights' loss
    assert (clone / "log_cpu" / "log.txt").read_text().startswith("-1 val ")


X86_WITHOUT_BF16 = "processor : 0\nflags : fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni\n"
X86_WITH_AMX = "processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM_WITH_BF16 = "processor : 0\nFeatures : fp asimd sve bf16 i8mm\n"


def test_dtype_auto_is_fp32_on_cpus_without_native_bf16_and_bf16_with_it():
    assert not devices.cpu_has_native_bf16(X86_WITHOUT_BF16)
    assert devices.cpu_has_native_bf16(X86_WITH_AMX)
    assert devices.cpu_has_native_bf16(ARM_WITH_BF16)
    assert not devices.cpu_has_native_bf16("")  # nothing known: no bf16
    assert devices.auto_dtype("cpu", native_bf16=True)[0] == torch.bfloat16
    assert devices.auto_dtype("cuda", native_bf16=True)[0] == torch.bfloat16
    assert devices.auto_dtype("cuda", native_bf16=False)[0] == torch.float16  # with a loss scaler
    assert devices.auto_dtype("mps", native_bf16=False)[0] == torch.float32
    dtype, reason = devices.auto_dtype("cpu", native_bf16=False)
    assert dtype == torch.float32 and "no native bf16" in reason  # the start-up block says why


SCRIPTS = [train_gpt2, fineweb, sample, hellaswag, export_hf, plot_log]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.__name__)
def test_help_gives_every_flag_a_reason_and_its_default_once(script, capsys):
    with pytest.raises(SystemExit) as exited:
        run_cli(script.main, ["--help"])
    assert exited.value.code == 0
    page = capsys.readouterr().out
    options = page[page.index("options:") :]
    # One entry per flag: from a line that begins with "  -" to the next such line.
    entries = re.split(r"\n(?=  -)", options)[1:]
    assert entries, page
    for entry in entries:
        flag = entry.split()[0]
        text = " ".join(entry.split())
        if flag == "-h,":
            continue
        where = f"{script.__name__}.py {flag}"
        assert "(default: None)" not in text, f"{where}: {text}"
        assert text.count("default") <= 1, f"{where} names its default twice: {text}"
        words = [word for word in text.split() if not word.startswith(("-", "{", "["))]
        reason = [word for word in words if not word.rstrip(",]").isupper()]
        assert len(reason) >= 2, f"{where} has no reason: {text}"


def test_greedy_sample_in_fp32_equals_hugging_face_greedy_decoding(text_shards, tmp_path, capsys):
    """A model trained for 50 steps (random weights have near-tied logits, where any rounding flips
    a choice), exported, then decoded greedily by sample.py and by transformers: the same text."""
    longer = "--seq_len 64 --total_batch_size 256 --max_steps 50 --warmup_steps 5 --max_lr 3e-3"
    flags = ["--data_dir", text_shards, "--log_dir", tmp_path / "log", "--device", "cpu"]
    run_trainer(*TINY_RUN, *longer.split(), "--eval_every", "50", *flags)
    checkpoint = str(tmp_path / "log" / "model_00049.pt")
    export_hf.main(["--init", checkpoint, "--out", str(tmp_path / "hf")])

    prompt, new_tokens = "The model", 24
    capsys.readouterr()
    sample.main(["--init", checkpoint, "--prompt", prompt, "--num_samples", "1",
                 "--max_new_tokens", str(new_tokens), "--temperature", "0", "--dtype", "float32",
                 "--device", "cpu"])  # fmt: skip
    ours = capsys.readouterr().out.splitlines()[1:]  # after the "---- sample 1/1 ----" line

    enc = gpt2_tokenizer()
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    prompt_ids = torch.tensor([enc.encode(prompt)])
    with torch.no_grad():
        out = hf_model.generate(prompt_ids, max_new_tokens=new_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert out.shape[1] == len(prompt_ids[0]) + new_tokens
    assert "\n".join(ours) == enc.decode(out[0].tolist())
