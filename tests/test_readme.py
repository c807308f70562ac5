"""The README's examples work as written: its Python blocks run (blocks after a `no-test` comment are
skipped), and every `hooked-bilinear` / `accelerate launch` command line in the README and the docs names
a real subcommand, parses, and (where it names a config) validates with its overrides."""

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, REPO / "docs" / "finetuning.md"]


def python_blocks() -> list[str]:
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"(<!--[^>]*-->\n)?```python\n(.*?)```", text, flags=re.S):
        if match.group(1) and "no-test" in match.group(1):
            continue
        blocks.append(match.group(2))
    return blocks


def command_lines() -> list[tuple[str, str]]:
    """(file name, command) for every CLI line of the shell blocks; placeholders (`...`, /path/to) skipped."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" # ")[0].split("  #")[0].strip()
                if ("hooked-bilinear " in line or "hooked_bilinear.cli" in line) and "..." not in line \
                        and "/path/to" not in line and not line.startswith(("python3 -m venv", "pip ")):
                    found.append((path.name, line))
    return found


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    # Blocks build on each other (quick start, then hooks), so run the earlier ones first.
    for block in python_blocks()[: index + 1]:
        exec(compile(block, f"README block {index}", "exec"), namespace)


@pytest.mark.parametrize("where, line", command_lines())
def test_documented_command_is_valid(where, line):
    from hooked_bilinear.cli import SUBCOMMANDS

    words = shlex.split(line)
    if words[0] == "accelerate":
        assert words[1] == "launch" and "-m" in words, line
        if "--config_file" in words:
            assert (REPO / words[words.index("--config_file") + 1]).is_file(), line
        words = words[words.index("-m") + 2:]  # after "-m hooked_bilinear.cli"
    else:
        assert words[0] == "hooked-bilinear", line
        words = words[1:]
    command, args = words[0], words[1:]
    assert command in SUBCOMMANDS, line
    if command not in ("train", "finetune"):
        return
    if command == "train":
        from training.run_config import load_run_config as load
        from training.train import parse_args
    else:
        from training.finetune import load_finetune_config as load
        from training.finetune import parse_args
    parsed = parse_args(args)
    if parsed.config:
        assert (REPO / parsed.config).is_file(), line
        load(REPO / parsed.config, parsed.overrides)  # unknown keys or bad values raise
    else:
        assert parsed.resume and parsed.out, f"{where}: without --config a command must be --resume --out: {line}"


def test_commands_were_found():
    # Guards the parser above: the README's training section alone has five train commands.
    assert sum("train" in line for _, line in command_lines()) >= 5
