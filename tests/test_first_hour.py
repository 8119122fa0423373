"""What a new user meets first: the README's tiny CPU run as written, the dtype that `--dtype auto` picks,
and `--help` pages that show every default once."""

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import devices
import export_hf
import fineweb
import hellaswag
import plot_log
import sample
import train_gpt2
from common import run_cli
from conftest import REPO


def readme_block(heading):
    """The commands of the first ```bash block after `heading` in README.md, continuation lines joined."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index(heading) :]
    block = section[section.index("```bash\n") + len("```bash\n") :]
    block = block[: block.index("```")]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_tiny_cpu_run_works_as_written(tmp_path):
    """The README's commands, word for word, except the download (a small local text instead) and the
    sizes, which flags appended to the same commands shrink (argparse keeps a flag's last value)."""
    commands = readme_block("## A tiny run on a CPU")
    assert commands[0].startswith("curl -o shakespeare.txt ")
    with open(os.path.join(REPO, "README.md")) as f:
        (tmp_path / "shakespeare.txt").write_text(f.read() * 3)  # real English, ~20K tokens
    smaller = {
        "fineweb.py": ["--shard_size", "8000"],
        "train_gpt2.py": "--n_layer 1 --n_embd 32 --max_steps 6 --warmup_steps 2 --eval_every 3 --ckpt_every 3 "
        "--val_tokens 512".split(),
        "sample.py": ["--max_new_tokens", "8"],
    }
    outputs = []
    for command in commands[1:]:
        argv = shlex.split(command)
        assert argv[0] == "python" and argv[1] in smaller, command
        if argv[1] == "sample.py":  # the README names the last checkpoint of its 250 steps; here there are 6
            argv = [arg.replace("model_00249.pt", "model_00005.pt") for arg in argv]
        argv = [sys.executable, os.path.join(REPO, argv[1]), *argv[2:], *smaller[argv[1]]]
        result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        outputs.append(result.stdout)

    # The training run's last block names a checkpoint and a log that exist, and the commands to go on.
    train_output = outputs[1]
    last_block = train_output[train_output.rindex("\ndone in ") :]
    checkpoint = re.search(r"^checkpoint  (\S+)$", last_block, re.M).group(1)
    log = re.search(r"^log         (\S+)$", last_block, re.M).group(1)
    assert checkpoint == "log_cpu/model_00005.pt" and os.path.isfile(tmp_path / checkpoint)
    assert log == "log_cpu/log.txt" and os.path.isfile(tmp_path / log)
    assert f"python sample.py --init {checkpoint}" in last_block and f"python plot_log.py {log}" in last_block
    assert re.search(r"^final       train loss \d+\.\d+ \| val loss \d+\.\d+ \(best", last_block, re.M)
    assert "sample 1/2" in outputs[2] and "ROMEO:" in outputs[2]


# --- --dtype auto ---------------------------------------------------------------------------------------

X86_WITHOUT_BF16 = "processor : 0\nflags : fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni\n"
X86_WITH_AMX = "processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM_WITH_BF16 = "processor : 0\nFeatures : fp asimd sve bf16 i8mm\n"


def test_dtype_auto_is_fp32_on_cpus_without_native_bf16_and_bf16_with_it():
    assert not devices.cpu_has_native_bf16(X86_WITHOUT_BF16)
    assert devices.cpu_has_native_bf16(X86_WITH_AMX)
    assert devices.cpu_has_native_bf16(ARM_WITH_BF16)
    assert not devices.cpu_has_native_bf16("")  # nothing known: no bf16
    assert devices.auto_dtype("cpu", native_bf16=False)[0] == torch.float32
    assert devices.auto_dtype("cpu", native_bf16=True)[0] == torch.bfloat16
    assert devices.auto_dtype("cuda", native_bf16=True)[0] == torch.bfloat16
    assert devices.auto_dtype("cuda", native_bf16=False)[0] == torch.float16  # with a loss scaler
    assert devices.auto_dtype("mps", native_bf16=False)[0] == torch.float32
    dtype, reason = devices.auto_dtype("cpu", native_bf16=False)
    assert "no native bf16" in reason  # the start-up block says why


# --- --help ---------------------------------------------------------------------------------------------

SCRIPTS = {
    "train_gpt2.py": train_gpt2.main,
    "fineweb.py": fineweb.main,
    "sample.py": sample.main,
    "hellaswag.py": hellaswag.main,
    "export_hf.py": export_hf.main,
    "plot_log.py": plot_log.main,
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_gives_every_flag_a_reason_and_its_default_once(script, capsys):
    with pytest.raises(SystemExit) as exited:
        run_cli(SCRIPTS[script], ["--help"])
    assert exited.value.code == 0
    page = capsys.readouterr().out
    options = page[page.index("options:") :]
    # One entry per flag: it starts at a line that begins with "  -" and runs until the next such line.
    entries = re.split(r"\n(?=  -)", options)[1:]
    assert entries, page
    for entry in entries:
        flag = entry.split()[0]
        text = " ".join(entry.split())
        if flag == "-h,":
            continue
        assert "(default: None)" not in text, f"{script} {flag}: {text}"
        assert text.count("default") <= 1, f"{script} {flag} names its default twice: {text}"
        reason = [w for w in text.split() if not (w.startswith(("-", "{", "[")) or w.rstrip(",]").isupper())]
        assert len(reason) >= 2, f"{script} {flag} has no reason: {text}"


# --- greedy sampling equals Hugging Face's -----------------------------------------------------------


def test_greedy_sample_in_fp32_equals_hugging_face_greedy_decoding(tmp_path, capsys):
    """A model trained for 50 steps (random weights have near-tied logits, where any rounding flips a
    choice), exported, then decoded greedily by sample.py and by transformers: the same text."""
    from transformers import GPT2LMHeadModel

    from common import gpt2_tokenizer

    with open(os.path.join(REPO, "README.md")) as f:
        (tmp_path / "text.txt").write_text(f.read() * 3)
    fineweb.main(["--input", str(tmp_path / "text.txt"), "--out", str(tmp_path / "data"), "--shard_size", "8000"])
    train = [sys.executable, os.path.join(REPO, "train_gpt2.py"), "--data_dir", str(tmp_path / "data")]
    flags = "--n_layer 2 --n_head 2 --n_embd 64 --block_size 64 --batch_size 4 --seq_len 64 --total_batch_size 256 "
    flags += "--max_steps 50 --warmup_steps 5 --max_lr 3e-3 --eval_every 50 --val_tokens 256 --no-hellaswag "
    flags += "--no-sample_every_eval --dtype float32 --device cpu"
    result = subprocess.run([*train, "--log_dir", str(tmp_path / "log"), *flags.split()], capture_output=True)
    assert result.returncode == 0, result.stderr
    checkpoint = str(tmp_path / "log" / "model_00049.pt")
    export_hf.main(["--init", checkpoint, "--out", str(tmp_path / "hf")])

    prompt, new_tokens = "The model", 24
    capsys.readouterr()
    sample.main(["--init", checkpoint, "--prompt", prompt, "--num_samples", "1", "--max_new_tokens", str(new_tokens),
                 "--temperature", "0", "--dtype", "float32", "--device", "cpu"])  # fmt: skip
    ours = capsys.readouterr().out.splitlines()[1:]  # after the "---- sample 1/1 ----" line

    enc = gpt2_tokenizer()
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    prompt_ids = torch.tensor([enc.encode(prompt)])
    with torch.no_grad():
        out = hf_model.generate(
            prompt_ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert out.shape[1] == len(prompt_ids[0]) + new_tokens
    assert "\n".join(ours) == enc.decode(out[0].tolist())
