"""How scripts end when they are stopped or killed: SIGTERM unwinds every script as Ctrl-C does
(its partial files removed, one line, exit 143), and what a killed export left is cleared."""

import os
import subprocess
import sys

import export_hf
import train_gpt2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigterm_ends_any_script_with_one_line_and_exit_143():
    # A script with no words of its own for a stop (sample.py, export_hf.py, ...), in a process of
    # its own: without run_cli's handler, SIGTERM would kill it outright (no clean-up, status -15).
    script = (
        "import os, signal, time\n"
        "from machinery.cli import run_cli\n"
        "def main(argv):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "run_cli(main)\n"
    )
    ended = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           cwd=REPO, timeout=60)  # fmt: skip
    assert (ended.returncode, ended.stderr.strip()) == (143, "terminated")


def test_an_export_clears_the_build_folders_a_killed_export_left(tmp_path):
    out = tmp_path / "gpt2-ours"
    left = [tmp_path / ".gpt2-ours.tmpab_cd123", tmp_path / ".gpt2-ours.tmpab_cd123.old"]
    others = [tmp_path / ".gpt2-ours2.tmpab_cd123", tmp_path / "gpt2-ours.tmpab_cd123"]
    for folder in left + others:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    config = train_gpt2.GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=8)
    export_hf.export_hf(train_gpt2.GPT(config), str(out))
    assert not any(folder.exists() for folder in left)
    assert all(folder.exists() for folder in others)  # another export's, or the user's
    assert sorted(os.listdir(out)) == sorted(export_hf.EXPORT_FILES)
