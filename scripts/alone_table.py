"""Print the engine-alone results (``bench/spike.py --alone-json DIR/alone_<mode>.json``) of a
directory as one markdown table: the last step of the device scripts that A/B the spike's
engine-alone modes. Usage: python3 scripts/alone_table.py DIR"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    rows = sorted(out.glob("alone_*.json"))
    if not rows:
        return
    print("| alone mode | tok/s | saturated tok/s | steps | shared-prefix steps | KV B/token |")
    print("|---|---|---|---|---|---|")
    for path in rows:
        a = json.loads(path.read_text())
        print(
            f"| {path.stem[6:]} | {a['tok_s']:,.0f} | {a['tok_s_saturated']:,.0f} | "
            f"{a['steps']} | {a.get('shared_prefix_steps')} | {a.get('kv_bytes_per_token')} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
