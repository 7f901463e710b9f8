"""README benchmark tables are generated from the JSON results, never edited by hand."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_tables_match_the_benchmark_json():
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "readme_tables.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_every_table_block_is_present():
    text = (REPO / "README.md").read_text()
    blocks = ["iopddl-table", "yardstick-table", "ilp-scaling-table", "first-call-table"]
    assert sum(f"<!-- BEGIN {b} -->" in text and f"<!-- END {b} -->" in text for b in blocks) == 4
