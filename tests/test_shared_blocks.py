"""Every `# --- shared: NAME ---` block is word for word the same in every script that has it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = re.compile(r"^# --- shared: (\S+) ---$"), "# --- end shared ---"


def shared_blocks(path: Path) -> dict:
    blocks, name, lines = {}, None, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        opened = START.match(line)
        if opened:
            assert name is None, f"{path.name}:{number}: block {opened[1]} opens inside block {name}"
            name, lines = opened[1], []
        elif line == END:
            assert name is not None, f"{path.name}:{number}: an end marker without a block"
            assert name not in blocks, f"{path.name}: block {name} appears twice"
            blocks[name] = "\n".join(lines)
            name = None
        elif name is not None:
            lines.append(line)
    assert name is None, f"{path.name}: block {name} is never closed"
    return blocks


def test_shared_blocks_are_identical_everywhere():
    scripts = [*sorted(ROOT.glob("opal_*.py")), ROOT / "collect_data.py"]
    assert len(scripts) > 2, "no opal_*.py scripts found"
    seen = {}
    for script in scripts:
        for name, text in shared_blocks(script).items():
            if name in seen:
                first_script, first_text = seen[name]
                assert text == first_text, f"shared block {name!r} differs between {first_script} and {script.name}"
            else:
                seen[name] = (script.name, text)
    assert {"networks", "slicer", "encoder"} <= set(seen)


def test_the_checker_sees_a_drift(tmp_path):
    text = (ROOT / "opal_vae.py").read_text()
    drifted = tmp_path / "drifted.py"
    drifted.write_text(text.replace("def mlp(in_dim: int,", "def mlp(in_features: int,"))
    assert shared_blocks(drifted)["networks"] != shared_blocks(ROOT / "opal_vae.py")["networks"]


def test_every_copied_block_is_used_by_its_script():
    """Blocks are cut by use: a script carries a block only if it calls something the block defines, or if the
    analysis tools call it from that script (policies_from_checkpoint: how they read an opal_cql.pt). Blocks that
    define no function or class, such as the import that registers the environments, act by being run."""
    definition = re.compile(r"^(?:def|class) ([A-Za-z_][A-Za-z0-9_]*)", re.M)
    tools = "\n".join(path.read_text() for path in sorted((ROOT / "analysis").glob("*.py")))
    for script in [*sorted(ROOT.glob("opal_*.py")), ROOT / "collect_data.py"]:
        text = script.read_text()
        module = re.compile(rf"^import {script.stem} as (\w+)\b", re.M).findall(tools)
        for name, block in shared_blocks(script).items():
            outside = text.replace(block, "")
            names = set(definition.findall(block))
            used_by_tools = any(re.search(rf"\b{alias}\.{re.escape(n)}\b", tools) for alias in module for n in names)
            assert not names or used_by_tools or any(re.search(rf"\b{re.escape(n)}\b", outside) for n in names), \
                f"{script.name} copies the shared block {name!r} but uses none of {sorted(names)}"
