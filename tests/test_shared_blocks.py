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
    assert {"datasets", "networks", "checkpoint"} <= set(seen)


def test_the_checker_sees_a_drift(tmp_path):
    text = (ROOT / "opal_vae.py").read_text()
    drifted = tmp_path / "drifted.py"
    drifted.write_text(text.replace("def fail(message: str):", "def fail(msg: str):"))
    assert shared_blocks(drifted)["datasets"] != shared_blocks(ROOT / "opal_vae.py")["datasets"]


def test_every_copied_block_is_used_by_its_script():
    """Blocks are cut by use: a script carries a block only if it calls something the block defines (blocks that
    define no function or class, such as the import that registers the environments, act by being run)."""
    definition = re.compile(r"^(?:def|class) ([A-Za-z_][A-Za-z0-9_]*)", re.M)
    for script in [*sorted(ROOT.glob("opal_*.py")), ROOT / "collect_data.py"]:
        text = script.read_text()
        for name, block in shared_blocks(script).items():
            outside = text.replace(block, "")
            names = set(definition.findall(block))
            assert not names or any(re.search(rf"\b{re.escape(n)}\b", outside) for n in names), \
                f"{script.name} copies the shared block {name!r} but uses none of {sorted(names)}"
