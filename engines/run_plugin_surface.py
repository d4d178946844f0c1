"""The vLLM internals clex's plugin relies on, checked in the vLLM virtualenv: names each one that is missing or
changed (and a vLLM version outside the tested ones), so an upgrade fails loudly here instead of serving wrong.

    python run_plugin_surface.py JOB.json OUT.json      (JOB unused; OUT: {"vllm": version, "problems": [...]})
"""

import json
import sys


def main() -> None:
    import vllm

    from clex_vllm.plugin import TESTED, surface

    json.dump({"vllm": vllm.__version__, "tested": list(TESTED), "problems": surface()}, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
