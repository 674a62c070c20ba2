"""The docs' code maps point at what they name: a line number given for a function, class or `__main__` in
docs/<script>.md is the line that defines it in <script>.py, and one given for `__main__` lies inside it (the
numbers drift whenever code above them grows)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"`([\w.]+)` \((?:line )?(\d+)")


def test_code_map_line_numbers_point_at_the_named_definition():
    checked = 0
    for doc in sorted((ROOT / "docs").glob("opal_*.md")):
        lines = (ROOT / f"{doc.stem}.py").read_text().splitlines()
        for name, number in REFERENCE.findall(doc.read_text()):
            line = lines[int(number) - 1].strip() if int(number) <= len(lines) else ""
            if name == "__main__":  # `__main__` itself or a block of it ("the CQL loop of `__main__`")
                start = lines.index('if __name__ == "__main__":') + 1
                assert int(number) >= start, f"{doc.name}: `__main__` (line {number}) is above line {start}"
                checked += 1
                continue
            short = name.split(".")[-1]
            if not any(re.match(rf"(def|class) {short}\b", l.strip()) for l in lines):
                continue  # not a definition of this script (a call, a flag)
            expected = f"def {short}(" if not short[0].isupper() else f"class {short}"
            assert line.startswith(expected), f"{doc.name}: `{name}` (line {number}) is `{line}` in {doc.stem}.py"
            checked += 1
    assert checked >= 15  # the maps of opal_vae.md, opal_cql.md, opal_fewshot_il.md, opal_online_sac.md
